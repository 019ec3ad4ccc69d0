//! `modules.dep` and `modules.builtin`: where a module's file is and what must load before it.
//!
//! depmod writes, per module, its path and the full dependency closure ordered so that loading
//! the list back to front satisfies every symbol (`a.ko: b.ko c.ko` → load c, b, then a).

use std::collections::{HashMap, HashSet};

use thiserror::Error;

use crate::modalias::normalize;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DepError {
    #[error("module {0} is not in this image (modules.dep has no entry); it cannot be loaded")]
    Unknown(String),
}

#[derive(Debug, Default, Clone)]
pub struct ModDep {
    /// Normalized name → (path relative to /lib/modules/KV, dependency paths).
    modules: HashMap<String, (String, Vec<String>)>,
    builtin: HashSet<String>,
}

/// `kernel/drivers/usb/host/xhci-pci.ko` → `xhci_pci` (also for `.ko.xz`, `.ko.zst`).
pub fn name_of(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    normalize(stem)
}

impl ModDep {
    pub fn parse(dep: &str, builtin: &str) -> Self {
        let modules = dep
            .lines()
            .filter_map(|line| {
                let (path, deps) = line.split_once(':')?;
                let path = path.trim();
                if path.is_empty() {
                    return None;
                }
                let deps = deps.split_whitespace().map(str::to_string).collect();
                Some((name_of(path), (path.to_string(), deps)))
            })
            .collect();
        let builtin = builtin
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(name_of)
            .collect();
        Self { modules, builtin }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.modules.contains_key(&normalize(name))
    }

    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&normalize(name))
    }

    /// Paths to load, dependencies first, the module itself last.
    pub fn load_order(&self, name: &str) -> Result<Vec<String>, DepError> {
        let (path, deps) = self
            .modules
            .get(&normalize(name))
            .ok_or_else(|| DepError::Unknown(name.to_string()))?;
        let mut order: Vec<String> = deps.iter().rev().cloned().collect();
        order.push(path.clone());
        Ok(order)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/usb/common/usb-common.ko:
kernel/drivers/usb/core/usbcore.ko: kernel/drivers/usb/common/usb-common.ko
kernel/drivers/usb/host/xhci-hcd.ko: kernel/drivers/usb/core/usbcore.ko kernel/drivers/usb/common/usb-common.ko
kernel/drivers/usb/host/xhci-pci.ko: kernel/drivers/usb/host/xhci-hcd.ko kernel/drivers/usb/core/usbcore.ko kernel/drivers/usb/common/usb-common.ko
kernel/fs/exfat/exfat.ko.xz:
garbage without colon
";

    #[test]
    fn orders_dependencies_before_the_module() {
        let d = ModDep::parse(DEP, "kernel/drivers/tty/serial/8250/8250.ko\n\n");
        assert_eq!(
            d.load_order("xhci-pci").unwrap(),
            vec![
                "kernel/drivers/usb/common/usb-common.ko",
                "kernel/drivers/usb/core/usbcore.ko",
                "kernel/drivers/usb/host/xhci-hcd.ko",
                "kernel/drivers/usb/host/xhci-pci.ko",
            ]
        );
        assert_eq!(
            d.load_order("usb_common").unwrap(),
            vec!["kernel/drivers/usb/common/usb-common.ko"]
        );
        assert_eq!(
            d.load_order("exfat").unwrap(),
            vec!["kernel/fs/exfat/exfat.ko.xz"]
        );
        assert_eq!(
            d.load_order("vhci-hcd"),
            Err(DepError::Unknown("vhci-hcd".into()))
        );
        assert!(d.is_builtin("8250"));
        assert!(!d.is_builtin("usbcore"));
        assert!(d.contains("usb-common"));
    }

    #[test]
    fn names_from_paths() {
        assert_eq!(name_of("a/b/nls_cp437.ko"), "nls_cp437");
        assert_eq!(name_of("x-y.ko.zst"), "x_y");
        assert_eq!(name_of(""), "");
    }
}
