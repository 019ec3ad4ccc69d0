//! Orderly power-off, reboot and halt (edge).
//!
//! Signals follow busybox init, so `kill -USR2 1` and friends do what people expect:
//! SIGUSR1 halt, SIGUSR2 power off, SIGTERM reboot, SIGINT (Ctrl-Alt-Del, which the init asks
//! the kernel to deliver as a signal) reboot.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tracing::{info, warn};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Halt,
    PowerOff,
    Reboot,
}

impl Action {
    pub fn for_signal(sig: Signal) -> Option<Self> {
        match sig {
            Signal::SIGUSR1 => Some(Self::Halt),
            Signal::SIGUSR2 => Some(Self::PowerOff),
            Signal::SIGTERM | Signal::SIGINT => Some(Self::Reboot),
            _ => None,
        }
    }
}

/// Stop every process, unmount the data partition and `reboot(2)`. Never returns.
pub fn run(action: Action, data: Option<&Path>) -> ! {
    info!("{action:?}: stopping all processes");
    // kill(-1) reaches every process except PID 1 itself. Interactive shells ignore SIGTERM
    // but leave on SIGHUP (their terminal "hung up").
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    let _ = kill(Pid::from_raw(-1), Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && !all_reaped() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left = user_processes();
    if !left.is_empty() {
        warn!("still running after 3 s, killing: {}", left.join(", "));
    }
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    let _ = all_reaped();
    nix::unistd::sync();
    if let Some(d) = data {
        if crate::mounts::release(d) {
            info!("data partition unmounted");
        } else {
            warn!("data partition still busy; remounted read-only");
        }
    }
    nix::unistd::sync();
    let mode = match action {
        Action::Halt => RebootMode::RB_HALT_SYSTEM,
        Action::PowerOff => RebootMode::RB_POWER_OFF,
        Action::Reboot => RebootMode::RB_AUTOBOOT,
    };
    info!("{}: {action:?}", crate::markers::SHUTDOWN);
    let err = match reboot(mode) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    warn!("reboot(2) failed: {err}; halting here");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// `pid:name` of every user-space process but PID 1 (kernel threads have no cmdline).
fn user_processes() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != 1)
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty()))
        .map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            format!("{pid}:{}", comm.trim())
        })
        .collect()
}

/// Reap what has exited; true once no children are left.
fn all_reaped() -> bool {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return false,
            Ok(_) => continue,
            Err(_) => return true, // ECHILD
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busybox_signal_conventions() {
        assert_eq!(Action::for_signal(Signal::SIGUSR1), Some(Action::Halt));
        assert_eq!(Action::for_signal(Signal::SIGUSR2), Some(Action::PowerOff));
        assert_eq!(Action::for_signal(Signal::SIGTERM), Some(Action::Reboot));
        assert_eq!(Action::for_signal(Signal::SIGINT), Some(Action::Reboot));
        assert_eq!(Action::for_signal(Signal::SIGCHLD), None);
        assert_eq!(Action::for_signal(Signal::SIGHUP), None);
    }
}
