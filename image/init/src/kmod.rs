//! Loading kernel modules without modprobe or udev (edge: files and `finit_module`).
//!
//! Coldplug walks `/sys/devices` for `modalias` files present at boot; hotplug feeds modaliases
//! from uevents; the kernel's own `request_module()` (file systems, NLS tables) reaches us because
//! `/sbin/modprobe` is this same binary. All three resolve through [`AliasTable`] and [`ModDep`]
//! and load with `finit_module(2)`.
//!
//! Compressed modules: Debian's 6.1 kernel ships plain `.ko`. A `.ko.xz`/`.ko.zst` is handed to
//! the kernel with `MODULE_INIT_COMPRESSED_FILE`, which only kernels ≥ 6.4 built with
//! `MODULE_DECOMPRESS` accept; we do not decompress in user space.

use std::ffi::CString;
use std::fs::File;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};
use thiserror::Error;
use tracing::{debug, warn};

use crate::modalias::AliasTable;
use crate::moddep::{name_of, DepError, ModDep};

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

pub struct Loader {
    /// `/lib/modules/KV`.
    dir: PathBuf,
    aliases: AliasTable,
    deps: ModDep,
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
        let modules = self.aliases.lookup(modalias);
        for m in &modules {
            if let Err(e) = self.load(m) {
                warn!("{modalias}: {e}");
            }
        }
        modules.len()
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
        if self.deps.is_builtin(name) {
            return Ok(());
        }
        for rel in self.deps.load_order(name)? {
            let module = name_of(&rel);
            if is_loaded(&module) {
                continue;
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
            match finit_module(&file, &self.params_for(&module), flags) {
                // debug, not info: two dozen lines on a framebuffer console cost boot time
                // under emulation, and the technician needs only what failed.
                Ok(()) => debug!("loaded module {module}"),
                // Another thread or the kernel's request_module() got there first.
                Err(Errno::EEXIST) => debug!("module {module} already loaded"),
                Err(errno) => return Err(KmodError::Load { path, errno }),
            }
        }
        Ok(())
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
}
