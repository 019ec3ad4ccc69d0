//! Loading kernel modules without modprobe or udev (edge: files and `finit_module`).
//!
//! Coldplug walks `/sys/devices` for `modalias` files present at boot; hotplug feeds modaliases
//! from uevents; the kernel's own `request_module()` (file systems, NLS tables) reaches us because
//! `/bin/modprobe` is this same binary. All three resolve through [`AliasTable`] and [`ModDep`]
//! and load with `finit_module(2)`.
//!
//! Compressed modules: Debian's 6.1 amd64 kernel ships plain `.ko` and is built without
//! `MODULE_DECOMPRESS`, so its modules stay uncompressed in the initramfs. A `.ko.xz`/`.ko.zst`
//! (the arm64 backports kernel's) is handed to the kernel with `MODULE_INIT_COMPRESSED_FILE`,
//! which kernels built with `MODULE_DECOMPRESS` (5.17 and later) accept; we do not decompress
//! in user space.

use std::ffi::CString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};
use thiserror::Error;
use tracing::{debug, warn};

use crate::modalias::AliasTable;
use crate::moddep::{name_of, DepError, ModDep};
use crate::softdep::SoftDeps;

/// `MODULE_INIT_COMPRESSED_FILE` from `<linux/module.h>` (not in nix's flag set).
const MODULE_INIT_COMPRESSED_FILE: nix::libc::c_uint = 4;

#[derive(Debug, Error)]
pub enum KmodError {
    #[error(transparent)]
    Dep(#[from] DepError),
    #[error("cannot open module {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the kernel refused module {path}: {errno} (wrong kernel version or missing dependency?)"
    )]
    Load { path: PathBuf, errno: Errno },
    #[error("no module in this image provides {0:?}")]
    NoProvider(String),
}

/// What loading the drivers for one modalias did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AliasLoad {
    /// Modules whose alias patterns match.
    pub matched: usize,
    /// Modules inserted by this call (not loaded before, not built in).
    pub inserted: usize,
}

pub struct Loader {
    /// `/lib/modules/KV`.
    dir: PathBuf,
    aliases: AliasTable,
    deps: ModDep,
    soft: SoftDeps,
    /// `(module, "param=value")` from the kernel command line.
    params: Vec<(String, String)>,
}

impl Loader {
    /// Read the module index of the running kernel from `root/lib/modules/KV`.
    pub fn open(root: &Path, release: &str) -> Self {
        let dir = root.join("lib/modules").join(release);
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let aliases = AliasTable::parse(&read("modules.alias"));
        let deps = ModDep::parse(&read("modules.dep"), &read("modules.builtin"));
        let soft = SoftDeps::parse(&read("modules.softdep"));
        if aliases.is_empty() {
            warn!(
                "no modules.alias in {}: no drivers will be loaded automatically",
                dir.display()
            );
        }
        Self {
            dir,
            aliases,
            deps,
            soft,
            params: Vec::new(),
        }
    }

    /// Options to pass when loading modules (see [`crate::cmdline::module_params`]).
    pub fn with_params(mut self, params: Vec<(String, String)>) -> Self {
        self.params = params;
        self
    }

    fn params_for(&self, module: &str) -> CString {
        let joined = self
            .params
            .iter()
            .filter(|(m, _)| m == module)
            .map(|(_, p)| p.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        // The command line cannot contain NUL; if it somehow did, load without options.
        CString::new(joined).unwrap_or_default()
    }

    /// Load the modules for a modalias. Returns how many modules matched.
    pub fn load_alias(&self, modalias: &str) -> usize {
        self.load_alias_counted(modalias).matched
    }

    /// Load the modules for a modalias, counting what matched and what was inserted now (the
    /// rest were loaded already: sixteen USB/IP root hubs all match the built-in hub driver).
    pub fn load_alias_counted(&self, modalias: &str) -> AliasLoad {
        let modules = self.aliases.lookup(modalias);
        let mut inserted = 0;
        for m in &modules {
            match self.load_nested(m, 0) {
                Ok(n) => inserted += n,
                Err(e) => warn!("{modalias}: {e}"),
            }
        }
        AliasLoad {
            matched: modules.len(),
            inserted,
        }
    }

    /// Load a module by name or alias, with what it depends on (the modprobe helper's job).
    pub fn load_name_or_alias(&self, name: &str) -> Result<(), KmodError> {
        if self.deps.contains(name) || self.deps.is_builtin(name) {
            return self.load(name);
        }
        if self.load_alias(name) == 0 {
            return Err(KmodError::NoProvider(name.to_string()));
        }
        Ok(())
    }

    /// Load one module and its dependencies; already loaded or built-in ones are skipped.
    pub fn load(&self, name: &str) -> Result<(), KmodError> {
        self.load_nested(name, 0).map(|_| ())
    }

    /// [`Loader::load`], returning how many modules this call inserted. Soft dependencies may
    /// name modules with soft dependencies of their own; `depth` bounds that (real chains are
    /// one deep; a cycle in a broken index must not recurse forever).
    fn load_nested(&self, name: &str, depth: usize) -> Result<usize, KmodError> {
        let mut inserted = 0;
        if self.deps.is_builtin(name) {
            return Ok(0);
        }
        for rel in self.deps.load_order(name)? {
            let module = name_of(&rel);
            if is_loaded(&module) {
                continue;
            }
            if depth < 3 {
                for pre in self.soft.pre(&module) {
                    inserted += self.load_soft(&module, pre, depth + 1);
                }
            }
            let path = self.dir.join(&rel);
            let file = File::open(&path).map_err(|source| KmodError::Open {
                path: path.clone(),
                source,
            })?;
            let compressed = rel.ends_with(".xz") || rel.ends_with(".zst") || rel.ends_with(".gz");
            let flags = if compressed {
                ModuleInitFlags::from_bits_retain(MODULE_INIT_COMPRESSED_FILE)
            } else {
                ModuleInitFlags::empty()
            };
            let started = Instant::now();
            match finit_module(&file, &self.params_for(&module), flags) {
                // debug, not info: two dozen lines on a framebuffer console cost boot time
                // under emulation, and the technician needs only what failed.
                Ok(()) => {
                    inserted += 1;
                    debug!(
                        "loaded module {module} in {} ms",
                        started.elapsed().as_millis()
                    )
                }
                // Another thread or the kernel's request_module() got there first.
                Err(Errno::EEXIST) => debug!("module {module} already loaded"),
                Err(errno) => return Err(KmodError::Load { path, errno }),
            }
        }
        Ok(inserted)
    }

    /// A soft dependency (a name or an alias such as `crct10dif`, which several modules
    /// provide) is a help, not a requirement: what fails to load is only a debug line (a
    /// CPU without PCLMULQDQ refuses crct10dif-pclmul; the generic one does the job).
    fn load_soft(&self, module: &str, pre: &str, depth: usize) -> usize {
        let names = if self.deps.contains(pre) || self.deps.is_builtin(pre) {
            vec![pre.to_string()]
        } else {
            self.aliases.lookup(pre)
        };
        names
            .iter()
            .map(|n| match self.load_nested(n, depth) {
                Ok(k) => k,
                Err(e) => {
                    debug!("{module}: soft dependency {n}: {e}");
                    0
                }
            })
            .sum()
    }

    /// Coldplug: load drivers for every device already present under `sys_devices`.
    pub fn coldplug(&self, sys_devices: &Path) -> usize {
        self.coldplug_where(sys_devices, |_| true)
    }

    /// Coldplug only the devices whose modalias `wanted` accepts (the boot loads
    /// [`is_usb_host`] first: the stick is behind one); already loaded drivers are skipped.
    pub fn coldplug_where(&self, sys_devices: &Path, wanted: impl Fn(&str) -> bool) -> usize {
        let mut aliases = Vec::new();
        collect_modaliases(sys_devices, &mut aliases, 0);
        aliases.retain(|a| wanted(a));
        self.coldplug_aliases(aliases)
    }

    /// [`Loader::coldplug_where`], one device after another on this thread.
    pub fn coldplug_serial(&self, sys_devices: &Path, wanted: impl Fn(&str) -> bool) -> usize {
        let mut aliases = Vec::new();
        collect_modaliases(sys_devices, &mut aliases, 0);
        aliases.retain(|a| wanted(a));
        aliases.sort();
        aliases.dedup();
        aliases.iter().map(|a| self.load_alias(a)).sum()
    }

    /// Load the drivers for these devices' modaliases, one thread per device.
    pub fn coldplug_aliases(&self, mut aliases: Vec<String>) -> usize {
        aliases.sort();
        aliases.dedup();
        // One thread per device: module init (a host controller starting its ports) is slow
        // under emulation and on real hardware, and independent drivers need not wait for each
        // other. The kernel serialises what must be: a shared dependency loads once, and a
        // module whose dependency is still initialising waits for it.
        std::thread::scope(|s| {
            let handles: Vec<_> = aliases
                .iter()
                .map(|a| s.spawn(move || self.load_alias(a)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        })
    }
}

/// A PCI USB host controller (class 0x0C, subclass 0x03: UHCI, OHCI, EHCI, xHCI): the boot
/// stick and the Mac are behind one.
pub fn is_usb_host(modalias: &str) -> bool {
    modalias.starts_with("pci:") && modalias.contains("bc0Csc03")
}

/// Devices whose drivers wait while the init waits for the data partition: USB interfaces
/// other than mass storage (keyboards, mice, a Mac, adapters), HID and input devices. On an
/// emulated CPU every module loaded meanwhile delays the stick; on real hardware the wait is a
/// fraction of a second either way.
pub fn waits_for_data(modalias: &str) -> bool {
    (modalias.starts_with("usb:") && !modalias.contains("ic08"))
        || modalias.starts_with("hid:")
        || modalias.starts_with("input:")
}

/// The modaliases of one bus's devices (`/sys/bus/pci/devices/*/modalias`; the entries are
/// links into `/sys/devices`, followed here).
pub fn bus_modaliases(bus_devices: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(bus_devices) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("modalias")).ok())
        .map(|t| t.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect()
}

/// `/sys/module/NAME/initstate` exists once a loadable module is live (or coming).
fn is_loaded(module: &str) -> bool {
    Path::new("/sys/module")
        .join(module)
        .join("initstate")
        .exists()
}

/// Walk sysfs for `modalias` files without following symlinks (sysfs links loop back).
fn collect_modaliases(dir: &Path, out: &mut Vec<String>, depth: usize) {
    // Real device trees are < 20 deep; the bound guards against surprises, not a known case.
    if depth > 32 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            collect_modaliases(&e.path(), out, depth + 1);
        } else if ft.is_file() && e.file_name() == "modalias" {
            if let Ok(text) = std::fs::read_to_string(e.path()) {
                let alias = text.trim();
                if !alias.is_empty() {
                    out.push(alias.to_string());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usb_host_controllers_are_told_from_other_pci_devices() {
        // QEMU's qemu-xhci and an Intel EHCI, as their sysfs modalias files read.
        assert!(is_usb_host(
            "pci:v00001B36d0000000Dsv00001AF4sd00001100bc0Csc03i30"
        ));
        assert!(is_usb_host(
            "pci:v00008086d00001E2Dsv00001043sd00008477bc0Csc03i20"
        ));
        // virtio-net (class 02), an SMBus controller (0C05), a USB device itself.
        assert!(!is_usb_host(
            "pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00"
        ));
        assert!(!is_usb_host(
            "pci:v00008086d00002930sv00001AF4sd00001100bc0Csc05i00"
        ));
        assert!(!is_usb_host(
            "usb:v46F4p0001d0000dc00dsc00dp00ic08isc06ip50in00"
        ));
    }

    #[test]
    fn only_storage_and_network_drivers_load_before_the_data_partition() {
        // The stick (QEMU's usb-storage, a UAS stick), its SCSI disk, the NIC: at once.
        assert!(!waits_for_data(
            "usb:v46F4p0001d0000dc00dsc00dp00ic08isc06ip50in00"
        ));
        assert!(!waits_for_data(
            "usb:v174Cp55AAd0100dc00dsc00dp00ic08isc06ip62in00"
        ));
        assert!(!waits_for_data("scsi:t-0x00"));
        assert!(!waits_for_data("virtio:d00000001v00001AF4"));
        assert!(!waits_for_data(
            "pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00"
        ));
        // A USB keyboard's interface, its HID device, its input device; a Mac in DFU mode.
        assert!(waits_for_data(
            "usb:v0627p0001d0000dc00dsc00dp00ic03isc01ip01in00"
        ));
        assert!(waits_for_data("hid:b0003g0001v00000627p00000001"));
        assert!(waits_for_data(
            "input:b0003v0627p0001e0111-e0,1,4,11,14,k71,72"
        ));
        assert!(waits_for_data(
            "usb:v05ACp1227d0000dc00dsc00dp00icFEisc01ip00in00"
        ));
    }
}
