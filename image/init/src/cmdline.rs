//! The kernel command line: the consoles the kernel was given and our `macrescue.*` settings.
//!
//! Split the way the kernel's own `next_arg()` does it: whitespace separates parameters, double
//! quotes group (so `macrescue.station="restore-agent devices --watch"` is one parameter) and are
//! dropped. Anything else on the line belongs to the kernel and is ignored here.

/// What the init takes from `/proc/cmdline`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KernelCmdline {
    /// Device names from every `console=` (`ttyS0` of `console=ttyS0,115200n8`), in order.
    pub consoles: Vec<String>,
    /// `macrescue.KEY=VALUE` pairs with the prefix removed; a bare `macrescue.KEY` means "true".
    pub settings: Vec<(String, String)>,
}

const PREFIX: &str = "macrescue.";

/// Split a command line into parameters, removing the grouping quotes.
pub fn split(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut in_word = false;
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut current));
                    in_word = false;
                }
            }
            c => {
                current.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(current);
    }
    words
}

pub fn parse(line: &str) -> KernelCmdline {
    let mut out = KernelCmdline::default();
    for word in split(line) {
        let (key, value) = match word.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (word.as_str(), None),
        };
        if key == "console" {
            if let Some(v) = value {
                // Options after the comma are the line speed etc.; the device is what we open.
                let dev = v.split(',').next().unwrap_or_default();
                if !dev.is_empty() {
                    out.consoles.push(dev.to_string());
                }
            }
        } else if let Some(name) = key.strip_prefix(PREFIX) {
            if !name.is_empty() {
                out.settings
                    .push((name.to_string(), value.unwrap_or("true").to_string()));
            }
        }
    }
    out
}

/// `module.param=value` words, as `(module, "param=value")` with the module name normalized:
/// the kernel applies these only to built-in code, so for loadable modules the loader passes
/// them at load time, as modprobe does.
pub fn module_params(line: &str) -> Vec<(String, String)> {
    split(line)
        .into_iter()
        .filter(|w| !w.starts_with(PREFIX))
        .filter_map(|w| {
            let (key, value) = w.split_once('=')?;
            let (module, param) = key.split_once('.')?;
            (!module.is_empty() && !param.is_empty()).then(|| {
                (
                    crate::modalias::normalize(module),
                    format!("{param}={value}"),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_on_whitespace_and_groups_quotes() {
        assert_eq!(
            split("  a b=\"c d\"  \"e f\"\tg\n"),
            vec!["a", "b=c d", "e f", "g"]
        );
        assert!(split("   ").is_empty());
        // An empty quoted value is still a parameter.
        assert_eq!(split("x=\"\""), vec!["x="]);
    }

    #[test]
    fn unterminated_quote_runs_to_the_end() {
        assert_eq!(split("a=\"b c"), vec!["a=b c"]);
    }

    #[test]
    fn takes_consoles_and_macrescue_settings() {
        let c = parse(
            "BOOT_IMAGE=/vmlinuz console=tty0 console=ttyS0,115200n8 quiet \
             macrescue.station=\"restore-agent devices --watch\" macrescue.debug \
             macrescue.data_wait=20 macrescue.=x console= panic=-1",
        );
        assert_eq!(c.consoles, vec!["tty0", "ttyS0"]);
        assert_eq!(
            c.settings,
            vec![
                (
                    "station".to_string(),
                    "restore-agent devices --watch".to_string()
                ),
                ("debug".to_string(), "true".to_string()),
                ("data_wait".to_string(), "20".to_string()),
            ]
        );
    }

    #[test]
    fn module_parameters_for_the_loader() {
        assert_eq!(
            module_params(
                "console=ttyS0 usb-storage.delay_use=0 macrescue.debug=1 .x=1 y.=2 \
                 xhci_hcd.quirks=\"0x40\" rd.break"
            ),
            vec![
                ("usb_storage".to_string(), "delay_use=0".to_string()),
                ("xhci_hcd".to_string(), "quirks=0x40".to_string()),
            ]
        );
    }

    #[test]
    fn never_panics_on_odd_input() {
        for s in [
            "\"",
            "=",
            "console",
            "macrescue.",
            "é\u{0}\"=\"",
            "console=,",
        ] {
            let _ = parse(s);
        }
    }
}
