//! `/etc/resolv.conf` from the DHCP leases of every link: the C library and our resolver read it.

use std::net::Ipv4Addr;
use std::path::Path;

/// glibc and musl read at most three nameservers.
const MAX_NAMESERVERS: usize = 3;

pub fn render(dns: &[Ipv4Addr], domains: &[String]) -> String {
    let mut s = String::from("# written by restore-agent from DHCP\n");
    let mut seen = Vec::new();
    for d in dns {
        if !seen.contains(d) && seen.len() < MAX_NAMESERVERS {
            seen.push(*d);
            s.push_str(&format!("nameserver {d}\n"));
        }
    }
    let mut search: Vec<&str> = Vec::new();
    for d in domains {
        if !d.is_empty() && !search.contains(&d.as_str()) {
            search.push(d);
        }
    }
    if !search.is_empty() {
        s.push_str(&format!("search {}\n", search.join(" ")));
    }
    s
}

/// Replaces the file atomically so a resolver never reads half of it.
pub fn write(path: &Path, contents: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("macrescue-tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_deduplicated_and_capped() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let s = render(
            &[
                ip("10.0.0.1"),
                ip("10.0.0.2"),
                ip("10.0.0.1"),
                ip("1.1.1.1"),
                ip("9.9.9.9"),
            ],
            &["lab".into(), "lab".into(), "corp".into()],
        );
        assert_eq!(
            s,
            "# written by restore-agent from DHCP\nnameserver 10.0.0.1\nnameserver 10.0.0.2\n\
             nameserver 1.1.1.1\nsearch lab corp\n"
        );
    }

    #[test]
    fn writes_atomically() {
        let dir = std::env::temp_dir().join(format!("macrescue-resolv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("resolv.conf");
        write(&p, "nameserver 10.0.0.1\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "nameserver 10.0.0.1\n"
        );
        assert!(!dir.join("resolv.macrescue-tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
