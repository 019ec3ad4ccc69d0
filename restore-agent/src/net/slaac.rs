//! IPv6: the kernel does SLAAC; we only make sure it is allowed to, per link.

use std::path::Path;

/// Sets `accept_ra=1` and `autoconf=1` under `<conf_dir>/<link>/` (normally
/// `/proc/sys/net/ipv6/conf`). A kernel without IPv6 has no such directory: not an error.
pub fn enable(conf_dir: &Path, link: &str) -> std::io::Result<()> {
    let dir = conf_dir.join(link);
    if !dir.is_dir() {
        tracing::debug!(link, "no IPv6 sysctls for this link; SLAAC stays off");
        return Ok(());
    }
    // accept_ra=1 is ignored when forwarding is on; a station never forwards.
    for (knob, value) in [("disable_ipv6", "0"), ("accept_ra", "1"), ("autoconf", "1")] {
        let p = dir.join(knob);
        if p.exists() {
            std::fs::write(&p, value)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_knobs_that_exist() {
        let dir = std::env::temp_dir().join(format!("macrescue-slaac-{}", std::process::id()));
        let link = dir.join("eth0");
        std::fs::create_dir_all(&link).unwrap();
        for k in ["accept_ra", "autoconf"] {
            std::fs::write(link.join(k), "0").unwrap();
        }
        enable(&dir, "eth0").unwrap();
        assert_eq!(
            std::fs::read_to_string(link.join("accept_ra")).unwrap(),
            "1"
        );
        assert_eq!(std::fs::read_to_string(link.join("autoconf")).unwrap(), "1");
        assert!(!link.join("disable_ipv6").exists());
        enable(&dir, "missing0").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
