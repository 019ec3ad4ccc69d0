//! Starting the station and the emergency shell (edge: processes).
//!
//! The init does not use `Child::wait`: as PID 1 it reaps every process in one place (SIGCHLD →
//! `waitpid(-1)`), and recognises its own children by pid.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;

use nix::unistd::Pid;
use tracing::warn;

use crate::consoles::Consoles;

const PATH: &str = "/bin:/sbin:/usr/bin:/usr/sbin";

/// The station's environment variable naming the file that exists while the init is still
/// handling the data partition (restore-agent's `station` waits for it to go).
pub const DATA_PENDING_ENV: &str = "MACRESCUE_DATA_PENDING";

/// Start the station with its stdout and stderr copied to every console. `data_pending`: the
/// station is started before the data partition is handled (see [`DATA_PENDING_ENV`]).
pub fn spawn_station(
    argv: &[String],
    consoles: Arc<Consoles>,
    data_dir: Option<&str>,
    data_pending: Option<&std::path::Path>,
) -> std::io::Result<Pid> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| std::io::Error::other("empty station command"))?;
    let (read, write) = nix::unistd::pipe()?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", data_dir.unwrap_or("/tmp"))
        .env("TERM", "linux")
        .current_dir(data_dir.unwrap_or("/tmp"))
        .stdin(Stdio::null())
        .stdout(Stdio::from(write.try_clone()?))
        .stderr(Stdio::from(write));
    if let Some(d) = data_dir {
        cmd.env("MACRESCUE_DATA", d);
    }
    if let Some(p) = data_pending {
        cmd.env(DATA_PENDING_ENV, p);
    }
    // The station asks for erase confirmations on the consoles the init set up (VGA and
    // serial alike); it reads this when neither its flags nor its config name consoles.
    cmd.env("MACRESCUE_CONSOLES", console_paths(&consoles.names()));
    unblock_signals_in_child(&mut cmd);
    let child = cmd.spawn()?;
    // The write ends now live only in the child (Command dropped them), so the copier sees EOF
    // when the station and anything it started are gone.
    drop(cmd);
    let mut read = File::from(read);
    std::thread::Builder::new()
        .name("station-output".into())
        .spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = read.read(&mut buf) {
                if n == 0 {
                    break;
                }
                consoles.write_all_consoles(&buf[..n]);
            }
        })?;
    Ok(Pid::from_raw(child.id() as i32))
}

/// `/dev/NAME` for each tty console, comma-separated (`/dev/console` is not a tty to ask on).
pub fn console_paths(names: &[String]) -> String {
    names
        .iter()
        .filter(|n| n.starts_with("tty"))
        .map(|n| format!("/dev/{n}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Start `/bin/sh` on `/dev/TTY` as a session leader with that tty as its controlling terminal.
pub fn spawn_shell(tty: &str) -> std::io::Result<Pid> {
    let path = format!("/dev/{tty}");
    let open =
        || -> std::io::Result<File> { OpenOptions::new().read(true).write(true).open(&path) };
    let (stdin, stdout, stderr) = (open()?, open()?, open()?);
    let mut cmd = Command::new("/bin/sh");
    cmd.env_clear()
        .env("PATH", PATH)
        .env("HOME", "/")
        .env("TERM", "linux")
        .current_dir("/")
        .stdin(stdin)
        .stdout(stdout)
        .stderr(stderr);
    unblock_signals_in_child(&mut cmd);
    // SAFETY: runs in the forked child before exec and calls only async-signal-safe functions
    // (setsid, ioctl) on the child's own fds.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()?;
            // Make stdin's tty the controlling terminal so Ctrl-C reaches the shell's jobs.
            if nix::libc::ioctl(0, nix::libc::TIOCSCTTY as _, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    Ok(Pid::from_raw(child.id() as i32))
}

/// PID 1 blocks the signals it takes through its signalfd, and a blocked mask survives exec:
/// without this the station and the shell would ignore SIGTERM/SIGHUP at shutdown (seen in the
/// boot test: both had to be SIGKILLed).
fn unblock_signals_in_child(cmd: &mut Command) {
    // SAFETY: runs in the forked child before exec; pthread_sigmask is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::signal::SigSet::all().thread_unblock()?;
            Ok(())
        });
    }
}

/// Whether the image carries a shell at all (the minimal image does not).
pub fn shell_available() -> bool {
    std::path::Path::new("/bin/sh").exists()
}

/// Log why a spawn failed in words a technician can act on.
pub fn explain_spawn_error(what: &str, argv: &[String], e: &std::io::Error) {
    if e.kind() == std::io::ErrorKind::NotFound {
        warn!(
            "{what}: {:?} is not in this image (looked in {PATH}); check macrescue.station / [init] station",
            argv.first().map(String::as_str).unwrap_or("")
        );
    } else {
        warn!("{what}: cannot start {argv:?}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erase_consoles_are_the_tty_consoles() {
        let names = ["tty0", "ttyS0", "console"].map(String::from);
        assert_eq!(console_paths(&names), "/dev/tty0,/dev/ttyS0");
        assert_eq!(console_paths(&[]), "");
    }
}
