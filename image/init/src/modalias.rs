//! `modules.alias`: which module drives a device, found by its modalias the way modprobe does.
//!
//! Each line is `alias PATTERN MODULE`; PATTERN is an fnmatch(3) glob (`*`, `?`, `[a-z]`,
//! `[!0-9]`, `\` escapes) matched against the whole modalias string the kernel publishes in
//! sysfs or a uevent (`usb:v05ACp1227d0000dc00dsc00dp00ic02isc01ip00in00`). Every matching
//! module is loaded, as modprobe does for a device alias.

/// Module names compare with `-` and `_` as the same character (the kernel stores `_`).
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

#[derive(Debug, Default, Clone)]
pub struct AliasTable {
    entries: Vec<(String, String)>,
}

impl AliasTable {
    /// Read `modules.alias`; lines that are not `alias PATTERN MODULE` are skipped.
    pub fn parse(text: &str) -> Self {
        let entries = text
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                match (words.next(), words.next(), words.next(), words.next()) {
                    (Some("alias"), Some(pattern), Some(module), None) => {
                        Some((pattern.to_string(), normalize(module)))
                    }
                    _ => None,
                }
            })
            .collect();
        Self { entries }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Modules whose pattern matches `modalias`, in file order, each once.
    pub fn lookup(&self, modalias: &str) -> Vec<String> {
        let mut found: Vec<String> = Vec::new();
        for (pattern, module) in &self.entries {
            if glob_match(pattern.as_bytes(), modalias.as_bytes()) && !found.contains(module) {
                found.push(module.clone());
            }
        }
        found
    }
}

/// fnmatch(3) without flags over bytes (modaliases are ASCII).
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // Where to resume after the last `*`: pattern index after it, text index it absorbed to.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            p += 1;
            star = Some((p, t));
            continue;
        }
        if p < pattern.len() {
            if let Some(next) = match_one(pattern, p, text[t]) {
                p = next;
                t += 1;
                continue;
            }
        }
        // Mismatch: let the last `*` swallow one more character, or fail.
        match star {
            Some((sp, st)) => {
                p = sp;
                t = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Does the single pattern element at `p` match `c`? Returns the index after the element.
fn match_one(pattern: &[u8], p: usize, c: u8) -> Option<usize> {
    match pattern[p] {
        b'?' => Some(p + 1),
        b'[' => match_class(pattern, p, c),
        b'\\' if p + 1 < pattern.len() => (pattern[p + 1] == c).then_some(p + 2),
        other => (other == c).then_some(p + 1),
    }
}

/// `[...]` at `p`; a `[` without a closing `]` is an ordinary character, as in fnmatch.
fn match_class(pattern: &[u8], p: usize, c: u8) -> Option<usize> {
    let mut i = p + 1;
    let negate = matches!(pattern.get(i), Some(b'!' | b'^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let Some(&lo) = pattern.get(i) else {
            return (c == b'[').then_some(p + 1);
        };
        if lo == b']' && !first {
            i += 1;
            break;
        }
        first = false;
        if pattern.get(i + 1) == Some(&b'-') && pattern.get(i + 2).is_some_and(|&h| h != b']') {
            let hi = pattern[i + 2];
            matched |= lo <= c && c <= hi;
            i += 3;
        } else {
            matched |= lo == c;
            i += 1;
        }
    }
    (matched != negate).then_some(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lines as depmod writes them for Debian 6.1 (trimmed).
    const SAMPLE: &str = "\
# Aliases extracted from modules themselves.
alias fs-exfat exfat
alias pci:v*d*sv*sd*bc0Csc03i30* xhci_pci
alias pci:v*d*sv*sd*bc0Csc03i20* ehci_pci
alias usb:v*p*d*dc*dsc*dp*ic08isc06ip50in* usb_storage
alias usb:v*p*d*dc*dsc*dp*ic08isc06ip62in* uas
alias usb:v152Dp0578d0000dc*dsc*dp*ic*isc*ip*in* usb_storage
alias scsi:t-0x00* sd_mod
alias scsi:t-0x0[47]* sd_mod
alias pci:v00008086d000010D3sv*sd*bc*sc*i* e1000e
alias pci:v000010ECd00008168sv*sd*bc*sc*i* r8169
alias virtio:d00000001v* virtio_net
alias nls-utf8 nls-utf8
bogus line
alias too many words here
";

    #[test]
    fn finds_modules_for_real_modaliases() {
        let t = AliasTable::parse(SAMPLE);
        assert_eq!(t.len(), 12);
        // qemu-xhci's PCI function.
        assert_eq!(
            t.lookup("pci:v00001B36d0000000Dsv00001AF4sd00001100bc0Csc03i30"),
            vec!["xhci_pci"]
        );
        // A USB mass-storage interface (bulk-only).
        assert_eq!(
            t.lookup("usb:v46F4p0001d0000dc00dsc00dp00ic08isc06ip50in00"),
            vec!["usb_storage"]
        );
        // The JMicron bridge matches both its quirk entry and nothing else.
        assert_eq!(
            t.lookup("usb:v152Dp0578d0000dc00dsc00dp00ic08isc06ip62in00"),
            vec!["uas", "usb_storage"]
        );
        assert_eq!(t.lookup("scsi:t-0x00"), vec!["sd_mod"]);
        assert_eq!(t.lookup("scsi:t-0x07"), vec!["sd_mod"]);
        assert!(t.lookup("scsi:t-0x05").is_empty());
        assert_eq!(
            t.lookup("pci:v000010ECd00008168sv00001043sd00008677bc02sc00i00"),
            vec!["r8169"]
        );
        assert_eq!(t.lookup("virtio:d00000001v00001AF4"), vec!["virtio_net"]);
        assert_eq!(t.lookup("fs-exfat"), vec!["exfat"]);
        assert_eq!(t.lookup("nls-utf8"), vec!["nls_utf8"]);
        assert!(t.lookup("fs-exfatx").is_empty());
        assert!(t.lookup("").is_empty());
    }

    // Device-tree and PHY aliases as depmod writes them for Debian's arm64 7.3 (trimmed): the
    // Raspberry Pi 5's RP1 devices and SD card are platform devices matched this way.
    const DT_SAMPLE: &str = "\
alias of:N*T*Csnps,dwc3C* dwc3
alias of:N*T*Csnps,dwc3 dwc3
alias of:N*T*Craspberrypi,rp1-gemC* macb
alias of:N*T*Craspberrypi,rp1-gem macb
alias of:N*T*Craspberrypi,rp1-gpioC* pinctrl_rp1
alias of:N*T*Craspberrypi,rp1-gpio pinctrl_rp1
alias of:N*T*Cbrcm,bcm2712-sdhciC* sdhci_brcmstb
alias of:N*T*Cbrcm,bcm2712-sdhci sdhci_brcmstb
alias of:N*T*Cregulator-fixed-clock fixed
alias of:N*T*Cregulator-fixed fixed
alias platform:xhci-hcd xhci_plat_hcd
alias pci:v00001DE4d00000001sv*sd*bc*sc*i* rp1_pci
alias mdio:0110000000001101100001001010???? broadcom
";

    #[test]
    fn finds_modules_for_device_tree_and_phy_modaliases() {
        let t = AliasTable::parse(DT_SAMPLE);
        // What the kernel publishes for the Pi 5's nodes (`of:N<name>T<type>C<compatible>...`).
        assert_eq!(t.lookup("of:NusbT(null)Csnps,dwc3"), vec!["dwc3"]);
        assert_eq!(t.lookup("of:NethernetTCraspberrypi,rp1-gem"), vec!["macb"]);
        assert_eq!(
            t.lookup("of:NpinctrlTCraspberrypi,rp1-gpio"),
            vec!["pinctrl_rp1"]
        );
        // Several compatibles: the first one matches the `C*` form.
        assert_eq!(
            t.lookup("of:NmmcTCbrcm,bcm2712-sdhciCbrcm,sdhci-brcmstb"),
            vec!["sdhci_brcmstb"]
        );
        // regulator-fixed must not be taken for regulator-fixed-clock, nor the reverse.
        assert_eq!(t.lookup("of:Nsd-vcc-regTCregulator-fixed"), vec!["fixed"]);
        assert!(t.lookup("of:NxTCregulator-fixedx").is_empty());
        assert!(t.lookup("of:NusbTCsnps,dwc31").is_empty());
        assert_eq!(t.lookup("platform:xhci-hcd"), vec!["xhci_plat_hcd"]);
        assert_eq!(
            t.lookup("pci:v00001DE4d00000001sv00001DE4sd00000001bc02sc00i00"),
            vec!["rp1_pci"]
        );
        // The BCM54213PE PHY (ID 0x600d84a2) as phylib asks for it through request_module().
        assert_eq!(
            t.lookup("mdio:01100000000011011000010010100010"),
            vec!["broadcom"]
        );
    }

    #[test]
    fn glob_behaves_like_fnmatch() {
        let m = |p: &str, t: &str| glob_match(p.as_bytes(), t.as_bytes());
        assert!(m("*", ""));
        assert!(m("a*b*c", "aXXbYYc"));
        assert!(!m("a*b*c", "aXXbYY"));
        assert!(m("a*c", "abcbc"));
        assert!(m("a?c", "abc"));
        assert!(!m("a?c", "ac"));
        assert!(m("[!0-9]x", "ax"));
        assert!(!m("[!0-9]x", "5x"));
        assert!(m("[]a]", "]"));
        assert!(m("[a-]", "-"));
        assert!(m("a\\*", "a*"));
        assert!(!m("a\\*", "ab"));
        assert!(m("[ab", "[ab"), "an unclosed class is literal");
        assert!(!m("abc", "ab"));
        assert!(!m("ab", "abc"));
    }

    #[test]
    fn never_panics() {
        for p in ["[", "[!", "[a-", "\\", "*[", "[]", "[!]"] {
            for t in ["", "a", "[", "]", "-"] {
                let _ = glob_match(p.as_bytes(), t.as_bytes());
            }
        }
    }
}
