//! `modules.softdep`: modules to load before another although no symbol links them, so depmod's
//! `modules.dep` does not list them (what modprobe calls `softdep … pre:`).
//!
//! The one that matters at boot: `crc_t10dif` (under `sd_mod`, the stick's disk driver) asks
//! the crypto API for "crct10dif" in its init. Without a provider loaded first, that becomes a
//! `request_module()`, i.e. the kernel starting `/bin/modprobe` (this binary) and waiting for
//! it — on the path to the data partition, and slow under emulation.

use std::collections::HashMap;

use crate::modalias::normalize;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SoftDeps {
    /// Normalized module name → names or aliases to load before it.
    pre: HashMap<String, Vec<String>>,
}

impl SoftDeps {
    /// Parse depmod's `softdep MODULE pre: A B post: C` lines; `post:` is not used at boot.
    pub fn parse(text: &str) -> Self {
        let mut pre: HashMap<String, Vec<String>> = HashMap::new();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            if words.next() != Some("softdep") {
                continue;
            }
            let Some(module) = words.next() else {
                continue;
            };
            let mut in_pre = false;
            let mut list = Vec::new();
            for w in words {
                match w {
                    "pre:" => in_pre = true,
                    "post:" => in_pre = false,
                    _ if in_pre => list.push(w.to_string()),
                    _ => {}
                }
            }
            if !list.is_empty() {
                pre.entry(normalize(module)).or_default().extend(list);
            }
        }
        Self { pre }
    }

    /// What to load before `module` (names or aliases, in the file's order).
    pub fn pre(&self, module: &str) -> &[String] {
        self.pre
            .get(&normalize(module))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pre_lists_and_ignores_post_and_junk() {
        // Debian 6.1's modules.softdep for the image's modules, plus edge cases.
        let s = SoftDeps::parse(
            "# Soft dependencies extracted from modules themselves.\n\
             softdep crc_t10dif pre: crct10dif\n\
             softdep crc64_rocksoft pre: crc64\n\
             softdep r8169 pre: realtek\n\
             softdep ohci_pci pre: ehci_pci\n\
             softdep snd_x post: snd_y pre: snd_z snd_w\n\
             softdep lonely\n\
             options usbcore autosuspend=1\n",
        );
        assert_eq!(s.pre("crc_t10dif"), ["crct10dif"]);
        assert_eq!(
            s.pre("crc-t10dif"),
            ["crct10dif"],
            "dashes and underscores are one"
        );
        assert_eq!(s.pre("r8169"), ["realtek"]);
        assert_eq!(s.pre("snd_x"), ["snd_z", "snd_w"]);
        assert!(s.pre("lonely").is_empty());
        assert!(s.pre("usbcore").is_empty());
        assert!(s.pre("xhci_pci").is_empty());
    }
}
