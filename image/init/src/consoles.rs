//! Every console the kernel was given gets the station's output and the init's log.
//!
//! `/dev/console` reaches only the *last* `console=` device; the kernel's own messages go to all
//! of them, and a technician may be looking at any (a serial cable or the screen). So the init
//! opens each device named in `/proc/consoles` (falling back to the `console=` arguments, then to
//! `/dev/console`) and writes every line to all of them.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Mutex;

/// Device names from `/proc/consoles` (`ttyS0  -W- (EC p a)  4:64` → `ttyS0`).
pub fn parse_proc_consoles(text: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for name in text.lines().filter_map(|l| l.split_whitespace().next()) {
        if !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
    }
    names
}

/// The open console devices; writes go to each, a failing one does not stop the others.
#[derive(Debug)]
pub struct Consoles {
    files: Mutex<Vec<(String, File)>>,
}

impl Consoles {
    /// Open `/dev/NAME` for each name; names that cannot be opened are skipped. With none left,
    /// `/dev/console` is used.
    pub fn open(names: &[String]) -> Self {
        let open = |path: &str| {
            OpenOptions::new()
                .write(true)
                // Never let a console become the init's controlling terminal: a hang-up on it
                // would otherwise signal PID 1.
                .custom_flags(nix::libc::O_NOCTTY)
                .open(path)
        };
        let mut files: Vec<(String, File)> = names
            .iter()
            .filter_map(|n| open(&format!("/dev/{n}")).ok().map(|f| (n.clone(), f)))
            .collect();
        if files.is_empty() {
            if let Ok(f) = open("/dev/console") {
                files.push(("console".to_string(), f));
            }
        }
        Self {
            files: Mutex::new(files),
        }
    }

    pub fn names(&self) -> Vec<String> {
        self.lock().iter().map(|(n, _)| n.clone()).collect()
    }

    /// Write `buf` to every console; serial lines want CRLF, which the tty layer adds (OPOST).
    pub fn write_all_consoles(&self, buf: &[u8]) {
        for (_, f) in self.lock().iter_mut() {
            let _ = f.write_all(buf);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, File)>> {
        // A panic while holding the lock cannot leave the file list inconsistent.
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `io::Write` handle for the log: whole buffers go to every console.
pub struct ConsoleWriter<'a>(pub &'a Consoles);

impl Write for ConsoleWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_all_consoles(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_proc_consoles() {
        let text = "tty0                 -WU (E  p  )    4:1\n\
                    ttyS0                -W- (EC p a)    4:64\n\
                    \n\
                    ttyS0                -W- (EC p a)    4:64\n";
        assert_eq!(parse_proc_consoles(text), vec!["tty0", "ttyS0"]);
        assert!(parse_proc_consoles("").is_empty());
    }

    #[test]
    fn writes_to_every_console_that_opened() {
        let dir = std::env::temp_dir().join(format!("macrescue-consoles-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a");
        let b = dir.join("b");
        std::fs::write(&a, b"").unwrap();
        std::fs::write(&b, b"").unwrap();
        // Absolute paths in a name still land under /dev/ → use relative trick: names are
        // appended to /dev/, so go up from there.
        let up = |p: &std::path::Path| format!("..{}", p.display());
        let c = Consoles::open(&[up(&a), "no-such-console-xyz".into(), up(&b)]);
        assert_eq!(c.names().len(), 2);
        let mut w = ConsoleWriter(&c);
        w.write_all(b"station ready\n").unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), b"station ready\n");
        assert_eq!(std::fs::read(&b).unwrap(), b"station ready\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
