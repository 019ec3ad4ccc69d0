//! Physical erase confirmation: a code typed at a local console, a GPIO button held down, and
//! fleet arming (one physical confirmation covers the next N Macs or T minutes).
//!
//! Erase invariant (ARCHITECTURE.md): every input read here is a local device file — a tty or a
//! GPIO line. There is deliberately no socket anywhere in this module, so nothing reachable over
//! a network can confirm, arm or force an erase.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use super::api::{EraseConfirmer, EraseDecision};

/// One local console the question is shown on and the answer read from.
pub struct ConsolePort {
    name: String,
    input: File,
    output: Box<dyn Write + Send>,
}

impl ConsolePort {
    /// Open a tty (e.g. `/dev/tty1` for VGA/HDMI, `/dev/ttyS0` for serial) for the question.
    pub fn open_tty(path: &Path) -> io::Result<ConsolePort> {
        // O_NOCTTY: the station must not become the tty's controlling process; O_NONBLOCK: the
        // confirmer polls several consoles at once.
        let input = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
            .open(path)?;
        // Output through its own, blocking open: a non-blocking write to a console still busy
        // with the dashboard's lines (a slow serial line) fails with EAGAIN, and the question
        // would be lost while its timeout still runs (seen in the VM demo).
        let output = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(path)?;
        Ok(ConsolePort {
            name: path.display().to_string(),
            input,
            output: Box::new(output),
        })
    }

    /// A console from an already-open input (made non-blocking here) and any writer; tests
    /// use a pipe and a buffer.
    pub fn from_parts(
        name: impl Into<String>,
        input: OwnedFd,
        output: Box<dyn Write + Send>,
    ) -> io::Result<ConsolePort> {
        let file = File::from(input);
        set_nonblocking(&file)?;
        Ok(ConsolePort {
            name: name.into(),
            input: file,
            output,
        })
    }
}

fn set_nonblocking(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on an fd we own, with flag arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Confirms an erase when a person types the code shown on screen, then Enter, at one of the
/// station's local consoles. The first complete line typed decides: the right code confirms,
/// anything else refuses. Silence until the timeout is a timeout.
pub struct ConsoleConfirmer {
    ports: Mutex<Vec<ConsolePort>>,
    timeout: Duration,
}

impl ConsoleConfirmer {
    pub fn new(ports: Vec<ConsolePort>, timeout: Duration) -> ConsoleConfirmer {
        ConsoleConfirmer {
            ports: Mutex::new(ports),
            timeout,
        }
    }

    pub fn open(paths: &[impl AsRef<Path>], timeout: Duration) -> io::Result<ConsoleConfirmer> {
        let ports = paths
            .iter()
            .map(|p| ConsolePort::open_tty(p.as_ref()))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(ConsoleConfirmer::new(ports, timeout))
    }
}

impl EraseConfirmer for ConsoleConfirmer {
    fn confirm_erase(&self, ecid: u64, code: &str, reason: &str) -> EraseDecision {
        // One question at a time: two Macs asking at once would otherwise race for one line.
        let mut ports = self.ports.lock().unwrap_or_else(|p| p.into_inner());
        let mut buffers = vec![Vec::<u8>::new(); ports.len()];
        for port in ports.iter_mut() {
            // Keys typed before the question must not answer it.
            drain(&mut port.input);
            let _ = write!(
                port.output,
                "\r\n*** ERASE Mac ECID 0x{ecid:016X}? {reason}\r\n*** To erase it, type {code} and press Enter (anything else refuses): "
            );
            let _ = port.output.flush();
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            let now = Instant::now();
            if now >= deadline {
                for port in ports.iter_mut() {
                    let _ = write!(port.output, "\r\n*** no answer: the Mac is not erased\r\n");
                }
                return EraseDecision::TimedOut;
            }
            let wait = (deadline - now).min(Duration::from_millis(200));
            let mut fds: Vec<libc::pollfd> = ports
                .iter()
                .map(|p| libc::pollfd {
                    fd: p.input.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            // SAFETY: `fds` is a live, correctly sized array of pollfd for the duration of poll.
            let n = unsafe {
                libc::poll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    wait.as_millis() as libc::c_int,
                )
            };
            if n <= 0 {
                continue;
            }
            for (i, fd) in fds.iter().enumerate() {
                if fd.revents & libc::POLLIN == 0 {
                    continue;
                }
                let mut chunk = [0u8; 256];
                let Ok(len) = ports[i].input.read(&mut chunk) else {
                    continue;
                };
                buffers[i].extend_from_slice(&chunk[..len]);
                let Some(end) = buffers[i].iter().position(|&b| b == b'\n' || b == b'\r') else {
                    continue;
                };
                let typed = String::from_utf8_lossy(&buffers[i][..end])
                    .trim()
                    .to_string();
                let name = ports[i].name.clone();
                let decision = if typed.eq_ignore_ascii_case(code) {
                    EraseDecision::Confirmed {
                        how: format!("code typed at {name}"),
                        at: SystemTime::now(),
                    }
                } else {
                    EraseDecision::Refused {
                        how: format!("wrong code typed at {name}"),
                    }
                };
                let verdict = match decision {
                    EraseDecision::Confirmed { .. } => "confirmed: erasing",
                    _ => "wrong code: the Mac is not erased",
                };
                for port in ports.iter_mut() {
                    let _ = write!(port.output, "\r\n*** {verdict}\r\n");
                }
                return decision;
            }
            // Fds that hung up (pipe closed) would make poll return at once forever.
            if fds
                .iter()
                .all(|f| f.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0)
            {
                std::thread::sleep(wait);
            }
        }
    }
}

fn drain(input: &mut File) {
    let mut chunk = [0u8; 256];
    while let Ok(n) = input.read(&mut chunk) {
        if n == 0 {
            break;
        }
    }
}

/// A push button's level, read by sampling.
pub trait ButtonLine: Send {
    fn is_pressed(&mut self) -> io::Result<bool>;
    /// Where the button is, for the report ("GPIO /dev/gpiochip0 line 17").
    fn describe(&self) -> String;
}

/// Confirms when a button is held for `hold` without letting go; released earlier refuses.
///
/// Time is counted in samples (`hold / poll` of them) rather than read off a clock, so a slow
/// machine cannot turn a short press into a long one, and tests are exact.
pub struct GpioConfirmer {
    line: Mutex<Box<dyn ButtonLine>>,
    hold: Duration,
    timeout: Duration,
    poll: Duration,
    notice: Mutex<Box<dyn Write + Send>>,
}

impl GpioConfirmer {
    pub fn new(line: Box<dyn ButtonLine>, hold: Duration, timeout: Duration) -> GpioConfirmer {
        GpioConfirmer {
            line: Mutex::new(line),
            hold,
            timeout,
            poll: Duration::from_millis(10),
            notice: Mutex::new(Box::new(io::sink())),
        }
    }

    /// Sampling interval (default 10 ms).
    pub fn with_poll(mut self, poll: Duration) -> Self {
        self.poll = poll.max(Duration::from_micros(1));
        self
    }

    /// Where to tell the person to hold the button (the console).
    pub fn with_notice(mut self, out: Box<dyn Write + Send>) -> Self {
        self.notice = Mutex::new(out);
        self
    }

    fn samples(&self, d: Duration) -> u64 {
        (d.as_nanos() / self.poll.as_nanos()).max(1) as u64
    }
}

impl EraseConfirmer for GpioConfirmer {
    fn confirm_erase(&self, ecid: u64, _code: &str, reason: &str) -> EraseDecision {
        let mut line = self.line.lock().unwrap_or_else(|p| p.into_inner());
        {
            let mut out = self.notice.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(
                out,
                "*** ERASE Mac ECID 0x{ecid:016X}? {reason}\n*** Hold the button for {} s to erase it.",
                self.hold.as_secs_f32()
            );
        }
        let hold = self.samples(self.hold);
        let budget = self.samples(self.timeout);
        let mut held = 0u64;
        for _ in 0..budget {
            match line.is_pressed() {
                Ok(true) => {
                    held += 1;
                    if held >= hold {
                        return EraseDecision::Confirmed {
                            how: format!(
                                "button held {} s ({})",
                                self.hold.as_secs_f32(),
                                line.describe()
                            ),
                            at: SystemTime::now(),
                        };
                    }
                }
                Ok(false) if held > 0 => {
                    return EraseDecision::Refused {
                        how: format!(
                            "button released after {:.1} s of {:.1} s ({})",
                            (self.poll * held as u32).as_secs_f32(),
                            self.hold.as_secs_f32(),
                            line.describe()
                        ),
                    };
                }
                Ok(false) => {}
                Err(e) => {
                    return EraseDecision::Refused {
                        how: format!("cannot read the button ({}): {e}", line.describe()),
                    }
                }
            }
            std::thread::sleep(self.poll);
        }
        EraseDecision::TimedOut
    }
}

/// Fleet wipes: one physical confirmation arms erase for the next `macs` Macs and/or `window`.
struct Armed {
    remaining: Option<u32>,
    until: Option<Instant>,
    by: String,
}

/// Wraps the station's physical confirmer. While armed, erase questions are answered
/// "confirmed, armed (fleet) by …" without asking; otherwise the inner confirmer asks.
pub struct ArmingConfirmer {
    inner: std::sync::Arc<dyn EraseConfirmer>,
    armed: Mutex<Option<Armed>>,
}

/// The code typed to arm fleet erase; distinct from every Mac's code so one cannot be
/// mistaken for the other.
pub const ARM_CODE_ECID: u64 = 0;

impl ArmingConfirmer {
    pub fn new(inner: std::sync::Arc<dyn EraseConfirmer>) -> ArmingConfirmer {
        ArmingConfirmer {
            inner,
            armed: Mutex::new(None),
        }
    }

    /// Ask for one physical confirmation (the inner confirmer, with `code`) and, if given, arm
    /// erase for the next `macs` Macs and/or `window`. Returns the decision.
    pub fn arm(&self, code: &str, macs: Option<u32>, window: Option<Duration>) -> EraseDecision {
        let what = match (macs, window) {
            (Some(n), Some(t)) => format!("the next {n} Macs or {} min", t.as_secs() / 60),
            (Some(n), None) => format!("the next {n} Macs"),
            (None, Some(t)) => format!("{} min", t.as_secs() / 60),
            (None, None) => {
                return EraseDecision::Refused {
                    how: "nothing to arm".into(),
                }
            }
        };
        let decision = self.inner.confirm_erase(
            ARM_CODE_ECID,
            code,
            &format!("ARM ERASE (fleet wipe) for {what}: every Mac restored then may be erased without asking"),
        );
        if let EraseDecision::Confirmed { how, .. } = &decision {
            *self.armed.lock().unwrap_or_else(|p| p.into_inner()) = Some(Armed {
                remaining: macs,
                until: window.map(|w| Instant::now() + w),
                by: how.clone(),
            });
        }
        decision
    }

    /// Drop any arming left (end of the fleet wipe).
    pub fn disarm(&self) {
        *self.armed.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    pub fn is_armed(&self) -> bool {
        let mut armed = self.armed.lock().unwrap_or_else(|p| p.into_inner());
        Self::still_valid(&mut armed)
    }

    fn still_valid(armed: &mut Option<Armed>) -> bool {
        let valid = match armed {
            Some(a) => {
                a.remaining.map_or(true, |n| n > 0) && a.until.map_or(true, |u| Instant::now() < u)
            }
            None => false,
        };
        if !valid {
            *armed = None;
        }
        valid
    }
}

impl EraseConfirmer for ArmingConfirmer {
    fn confirm_erase(&self, ecid: u64, code: &str, reason: &str) -> EraseDecision {
        {
            let mut armed = self.armed.lock().unwrap_or_else(|p| p.into_inner());
            if Self::still_valid(&mut armed) {
                // still_valid returned true, so it is Some.
                if let Some(a) = armed.as_mut() {
                    if let Some(n) = a.remaining.as_mut() {
                        *n -= 1;
                    }
                    return EraseDecision::Confirmed {
                        how: format!("armed (fleet) by {}", a.by),
                        at: SystemTime::now(),
                    };
                }
            }
        }
        self.inner.confirm_erase(ecid, code, reason)
    }
}

/// For stations with no local console or button: every erase is refused, so a revive that
/// needs an erase stops with its message instead.
pub struct NoConfirmer;

impl EraseConfirmer for NoConfirmer {
    fn confirm_erase(&self, _ecid: u64, _code: &str, _reason: &str) -> EraseDecision {
        EraseDecision::Refused {
            how: "no local console or button configured on this station".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;
    use std::sync::Arc;

    fn pipe() -> (OwnedFd, File) {
        let mut fds = [0; 2];
        // SAFETY: pipe writes two fresh fds into the array, which we then own.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        unsafe { (OwnedFd::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn console(timeout: Duration) -> (ConsoleConfirmer, File, Shared) {
        let (r, w) = pipe();
        let out = Shared::default();
        let port = ConsolePort::from_parts("tty-test", r, Box::new(out.clone())).unwrap();
        (ConsoleConfirmer::new(vec![port], timeout), w, out)
    }

    #[test]
    fn right_code_confirms_and_is_shown() {
        let (c, mut w, out) = console(Duration::from_secs(20));
        let code = super::super::api::erase_code(0x1234);
        let typed = code.clone();
        let t = std::thread::spawn(move || {
            // Wait until the question is out, so the answer is not drained as stale input.
            while !String::from_utf8_lossy(&out.0.lock().unwrap()).contains("press Enter") {
                std::thread::sleep(Duration::from_millis(1));
            }
            w.write_all(format!("{typed}\n").as_bytes()).unwrap();
            (w, out)
        });
        let d = c.confirm_erase(0x1234, &code, "revive failed");
        let (_w, out) = t.join().unwrap();
        match d {
            EraseDecision::Confirmed { how, .. } => assert_eq!(how, "code typed at tty-test"),
            other => panic!("{other:?}"),
        }
        let shown = String::from_utf8_lossy(&out.0.lock().unwrap()).to_string();
        assert!(
            shown.contains(&format!("type {code} and press Enter")),
            "{shown}"
        );
        assert!(shown.contains("ECID 0x0000000000001234"), "{shown}");
    }

    #[test]
    fn wrong_code_refuses() {
        let (c, mut w, out) = console(Duration::from_secs(20));
        let t = std::thread::spawn(move || {
            while !String::from_utf8_lossy(&out.0.lock().unwrap()).contains("press Enter") {
                std::thread::sleep(Duration::from_millis(1));
            }
            w.write_all(b"000000\r").unwrap();
            w
        });
        let d = c.confirm_erase(7, "123456", "x");
        t.join().unwrap();
        assert_eq!(
            d,
            EraseDecision::Refused {
                how: "wrong code typed at tty-test".into()
            }
        );
    }

    #[test]
    fn stale_input_does_not_answer_and_silence_times_out() {
        let (c, mut w, _out) = console(Duration::from_millis(50));
        w.write_all(b"123456\n").unwrap();
        assert_eq!(c.confirm_erase(7, "123456", "x"), EraseDecision::TimedOut);
    }

    /// Pressed for the first `pressed` samples then released (None: pressed forever).
    struct FakeButton {
        pressed: Option<u64>,
        delay: u64,
        n: u64,
    }
    impl ButtonLine for FakeButton {
        fn is_pressed(&mut self) -> io::Result<bool> {
            self.n += 1;
            Ok(self.n > self.delay && self.pressed.map_or(true, |p| self.n <= self.delay + p))
        }
        fn describe(&self) -> String {
            "fake line".into()
        }
    }

    fn gpio(pressed: Option<u64>, delay: u64) -> GpioConfirmer {
        // 30 samples of hold, 100 of timeout.
        GpioConfirmer::new(
            Box::new(FakeButton {
                pressed,
                delay,
                n: 0,
            }),
            Duration::from_micros(300),
            Duration::from_micros(1000),
        )
        .with_poll(Duration::from_micros(10))
    }

    #[test]
    fn button_held_long_enough_confirms() {
        match gpio(None, 5).confirm_erase(1, "", "x") {
            EraseDecision::Confirmed { how, .. } => assert!(how.contains("fake line"), "{how}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn button_released_early_refuses() {
        match gpio(Some(10), 5).confirm_erase(1, "", "x") {
            EraseDecision::Refused { how } => {
                assert!(how.starts_with("button released after"), "{how}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn button_never_pressed_times_out() {
        assert_eq!(
            gpio(Some(0), 0).confirm_erase(1, "", "x"),
            EraseDecision::TimedOut
        );
    }

    /// Answers from a script and counts how often it was asked.
    struct Scripted {
        answer: EraseDecision,
        asked: Mutex<u32>,
    }
    impl EraseConfirmer for Scripted {
        fn confirm_erase(&self, _: u64, _: &str, _: &str) -> EraseDecision {
            *self.asked.lock().unwrap() += 1;
            self.answer.clone()
        }
    }

    fn scripted(answer: EraseDecision) -> Arc<Scripted> {
        Arc::new(Scripted {
            answer,
            asked: Mutex::new(0),
        })
    }

    #[test]
    fn arming_for_n_macs_answers_n_then_asks_again() {
        let inner = scripted(EraseDecision::Confirmed {
            how: "code typed at /dev/tty1".into(),
            at: SystemTime::now(),
        });
        let arming = ArmingConfirmer::new(inner.clone());
        assert!(matches!(
            arming.arm("999999", Some(2), None),
            EraseDecision::Confirmed { .. }
        ));
        assert_eq!(*inner.asked.lock().unwrap(), 1);
        for _ in 0..2 {
            match arming.confirm_erase(5, "x", "y") {
                EraseDecision::Confirmed { how, .. } => {
                    assert_eq!(how, "armed (fleet) by code typed at /dev/tty1")
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(*inner.asked.lock().unwrap(), 1, "armed answers ask no one");
        assert!(!arming.is_armed());
        arming.confirm_erase(5, "x", "y");
        assert_eq!(
            *inner.asked.lock().unwrap(),
            2,
            "the third Mac is asked again"
        );
    }

    #[test]
    fn arming_for_a_window_expires() {
        let inner = scripted(EraseDecision::Confirmed {
            how: "button".into(),
            at: SystemTime::now(),
        });
        let arming = ArmingConfirmer::new(inner.clone());
        arming.arm("1", None, Some(Duration::from_secs(3600)));
        assert!(arming.is_armed());
        assert!(
            matches!(arming.confirm_erase(1, "", ""), EraseDecision::Confirmed { how, .. } if how.starts_with("armed (fleet)"))
        );
        arming.arm("1", None, Some(Duration::ZERO));
        assert!(!arming.is_armed(), "a zero window is already over");
        arming.confirm_erase(1, "", "");
        assert_eq!(*inner.asked.lock().unwrap(), 3);
    }

    #[test]
    fn refused_arming_arms_nothing() {
        let inner = scripted(EraseDecision::Refused { how: "no".into() });
        let arming = ArmingConfirmer::new(inner.clone());
        arming.arm("1", Some(10), None);
        assert!(!arming.is_armed());
        assert_eq!(
            arming.confirm_erase(1, "", ""),
            EraseDecision::Refused { how: "no".into() }
        );
    }
}
