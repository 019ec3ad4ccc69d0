//! What the station shows: one row per Mac, redrawn in place on a terminal, or one plain line
//! per change for serial consoles (line mode).

use std::collections::VecDeque;
use std::time::Instant;

use super::api::{EngineEvent, Stage};

/// One Mac on screen.
#[derive(Debug, Clone)]
pub struct Row {
    pub port: String,
    pub model: String,
    pub ecid: Option<u64>,
    pub stage: Option<Stage>,
    pub progress: Option<(u64, Option<u64>)>,
    pub rate_bps: Option<f64>,
    pub last: String,
    pub result: Option<bool>,
    last_line_pct: Option<u64>,
}

impl Row {
    pub fn new(port: String, ecid: Option<u64>) -> Row {
        Row {
            port,
            model: String::new(),
            ecid,
            stage: None,
            progress: None,
            rate_bps: None,
            last: "waiting".into(),
            result: None,
            last_line_pct: None,
        }
    }

    pub fn ecid_label(&self) -> String {
        self.ecid
            .map(|e| format!("0x{e:016X}"))
            .unwrap_or_else(|| "?".into())
    }

    fn eta_secs(&self) -> Option<u64> {
        let (done, total) = self.progress?;
        let rate = self.rate_bps.filter(|r| *r > 0.0)?;
        Some((total?.saturating_sub(done) as f64 / rate).ceil() as u64)
    }

    /// Apply an engine event; returns the line-mode lines it produces (usually one, none for
    /// progress that did not cross a 25 % step).
    pub fn apply(&mut self, ev: &EngineEvent) -> Vec<String> {
        let p = &self.port;
        match ev {
            EngineEvent::Stage { stage } => {
                self.stage = Some(*stage);
                self.progress = None;
                self.rate_bps = None;
                self.last_line_pct = None;
                vec![format!("mac {p}: stage {stage:?}")]
            }
            EngineEvent::Identified {
                ecid,
                product_type,
                board,
                name,
            } => {
                self.ecid = Some(*ecid);
                self.model = product_type.clone();
                self.last = name.clone();
                vec![format!(
                    "mac {p}: identified {name} ({product_type}, {board}) ECID 0x{ecid:016X}"
                )]
            }
            EngineEvent::Build { version, build } => {
                self.last = format!("macOS {version} ({build})");
                vec![format!("mac {p}: build {version} ({build})")]
            }
            EngineEvent::Progress {
                what,
                done,
                total,
                rate_bps,
            } => {
                self.progress = Some((*done, *total));
                if rate_bps.is_some() {
                    self.rate_bps = *rate_bps;
                }
                self.last = what.clone();
                let Some(total) = total.filter(|t| *t > 0) else {
                    return vec![];
                };
                let step = done.saturating_mul(100) / total / 25 * 25;
                if self.last_line_pct == Some(step) {
                    return vec![];
                }
                self.last_line_pct = Some(step);
                vec![format!("mac {p}: {what} {step}% ({done}/{total} bytes)")]
            }
            EngineEvent::Checkpoint { name, result } => {
                vec![format!("mac {p}: checkpoint {name} = {result}")]
            }
            EngineEvent::Message(m) => {
                self.last = m.clone();
                vec![format!("mac {p}: {m}")]
            }
            EngineEvent::Failed {
                cause, next_step, ..
            } => {
                self.result = Some(false);
                self.last = format!("FAILED: {cause} — {next_step}");
                vec![format!("mac {p}: FAILED: {cause}; next: {next_step}")]
            }
            EngineEvent::Succeeded => {
                self.result = Some(true);
                self.stage = Some(Stage::Done);
                self.last = "restored: unplug the Mac".into();
                vec![format!("mac {p}: done, restored")]
            }
        }
    }

    /// Show a note on the row and return its line.
    pub fn note(&mut self, text: String) -> String {
        let line = format!("mac {}: {text}", self.port);
        self.last = text;
        line
    }
}

/// The header's station facts.
#[derive(Debug, Clone, Default)]
pub struct Header {
    pub network: String,
    pub cache: String,
    pub done: u32,
    pub failed: u32,
    pub waiting: usize,
}

pub struct Board {
    pub header: Header,
    pub rows: Vec<Row>,
    pub notes: VecDeque<String>,
    started: Instant,
}

const NOTES_KEPT: usize = 4;

impl Default for Board {
    fn default() -> Self {
        Board {
            header: Header::default(),
            rows: Vec::new(),
            notes: VecDeque::new(),
            started: Instant::now(),
        }
    }
}

impl Board {
    pub fn push_note(&mut self, note: String) {
        if self.notes.len() == NOTES_KEPT {
            self.notes.pop_front();
        }
        self.notes.push_back(note);
    }

    /// The whole screen as text lines of at most `width` characters, no escape codes.
    pub fn lines(&self, width: usize) -> Vec<String> {
        let h = &self.header;
        let active = self.rows.iter().filter(|r| r.result.is_none()).count();
        let up = self.started.elapsed().as_secs();
        let mut out = vec![
            format!(
                "macrescue station | net: {} | cache: {} | up {}:{:02}",
                h.network,
                h.cache,
                up / 60,
                up % 60
            ),
            format!(
                "Macs: {active} working, {} waiting, {} done, {} failed",
                h.waiting, h.done, h.failed
            ),
            String::new(),
            format!(
                "{:<8} {:<16} {:<18} {:<11} {:<22} {:>9} {:>6}  {}",
                "PORT", "MODEL", "ECID", "STAGE", "PROGRESS", "RATE", "ETA", "LAST MESSAGE"
            ),
        ];
        for r in &self.rows {
            let stage = match (r.result, r.stage) {
                (Some(true), _) => "DONE".to_string(),
                (Some(false), _) => "FAILED".to_string(),
                (None, Some(s)) => format!("{s:?}"),
                (None, None) => "-".to_string(),
            };
            let rate = r.rate_bps.map(human_rate).unwrap_or_default();
            let eta = r
                .eta_secs()
                .map(|s| format!("{}:{:02}", s / 60, s % 60))
                .unwrap_or_default();
            out.push(format!(
                "{:<8} {:<16} {:<18} {:<11} {:<22} {:>9} {:>6}  {}",
                cut(&r.port, 8),
                cut(&r.model, 16),
                r.ecid_label(),
                stage,
                bar(r.progress),
                rate,
                eta,
                r.last
            ));
        }
        if !self.notes.is_empty() {
            out.push(String::new());
            out.extend(self.notes.iter().cloned());
        }
        out.into_iter().map(|l| cut(&l, width)).collect()
    }

    /// The screen for a terminal: cursor home, each line cleared to its end, the rest cleared,
    /// so a redraw replaces the previous one without flicker.
    pub fn render_ansi(&self, width: usize) -> String {
        let mut s = String::from("\x1b[H");
        for l in self.lines(width) {
            s.push_str(&l);
            s.push_str("\x1b[K\r\n");
        }
        s.push_str("\x1b[J");
        s
    }
}

fn cut(s: &str, width: usize) -> String {
    s.chars().take(width).collect()
}

fn human_rate(bps: f64) -> String {
    if bps >= 1024.0 * 1024.0 {
        format!("{:.1}MiB/s", bps / 1024.0 / 1024.0)
    } else {
        format!("{:.0}KiB/s", bps / 1024.0)
    }
}

/// `[#######.......]  45%` — 22 characters.
fn bar(progress: Option<(u64, Option<u64>)>) -> String {
    match progress {
        Some((done, Some(total))) if total > 0 => {
            let pct = (done.min(total) * 100 / total) as usize;
            let filled = pct * 15 / 100;
            format!(
                "[{}{}] {:>3}%",
                "#".repeat(filled),
                ".".repeat(15 - filled),
                pct
            )
        }
        Some((done, None)) => format!("{} MiB", done / (1024 * 1024)),
        _ => String::new(),
    }
}

/// Terminal width: the tty's own size (TIOCGWINSZ), else `COLUMNS`, else 80.
pub fn terminal_width() -> usize {
    // SAFETY: TIOCGWINSZ fills one winsize struct, which lives across the call.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    if rc == 0 && ws.ws_col > 0 {
        return usize::from(ws.ws_col);
    }
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse().ok())
        .filter(|c| *c > 0)
        .unwrap_or(80)
}

/// Line mode when stdout is not a terminal, TERM says the terminal cannot take escape codes,
/// or stdout is a serial port (whatever TERM claims, the other end may be a dumb logger).
pub fn want_line_mode() -> bool {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() {
        return true;
    }
    if matches!(
        std::env::var("TERM").as_deref(),
        Err(_) | Ok("") | Ok("dumb")
    ) {
        return true;
    }
    std::fs::read_link("/proc/self/fd/1")
        .map(|p| is_serial_tty(&p.to_string_lossy()))
        .unwrap_or(false)
}

fn is_serial_tty(path: &str) -> bool {
    [
        "/dev/ttyS",
        "/dev/ttyAMA",
        "/dev/ttyUSB",
        "/dev/ttyGS",
        "/dev/hvc",
    ]
    .iter()
    .any(|p| path.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_mode_lines_are_exact() {
        let mut r = Row::new("1-3".into(), None);
        let evs = [
            EngineEvent::Identified {
                ecid: 0x1e,
                product_type: "MacBookAir10,1".into(),
                board: "J313AP".into(),
                name: "MacBook Air (M1, 2020)".into(),
            },
            EngineEvent::Stage { stage: Stage::Dfu },
            EngineEvent::Progress {
                what: "iBSS".into(),
                done: 10,
                total: Some(100),
                rate_bps: Some(1000.0),
            },
            EngineEvent::Progress {
                what: "iBSS".into(),
                done: 20,
                total: Some(100),
                rate_bps: None,
            },
            EngineEvent::Progress {
                what: "iBSS".into(),
                done: 60,
                total: Some(100),
                rate_bps: None,
            },
            EngineEvent::Checkpoint {
                name: "CHECKPOINT_X".into(),
                result: 0,
            },
            EngineEvent::Failed {
                cause: "USB link dropped".into(),
                next_step: "replug the cable".into(),
                erase_could_fix: false,
            },
        ];
        let lines: Vec<String> = evs.iter().flat_map(|e| r.apply(e)).collect();
        assert_eq!(
            lines,
            [
                "mac 1-3: identified MacBook Air (M1, 2020) (MacBookAir10,1, J313AP) ECID 0x000000000000001E",
                "mac 1-3: stage Dfu",
                "mac 1-3: iBSS 0% (10/100 bytes)",
                "mac 1-3: iBSS 50% (60/100 bytes)",
                "mac 1-3: checkpoint CHECKPOINT_X = 0",
                "mac 1-3: FAILED: USB link dropped; next: replug the cable",
            ]
        );
        assert!(lines.iter().all(|l| !l.contains('\x1b')));
    }

    #[test]
    fn terminal_rows_show_progress_rate_and_eta() {
        let mut b = Board::default();
        let mut r = Row::new("1-2".into(), Some(0xabc));
        r.apply(&EngineEvent::Stage {
            stage: Stage::Firmware,
        });
        r.apply(&EngineEvent::Progress {
            what: "downloading".into(),
            done: 50 << 20,
            total: Some(100 << 20),
            rate_bps: Some(10.0 * 1024.0 * 1024.0),
        });
        b.rows.push(r);
        let lines = b.lines(200);
        let row = &lines[4];
        assert!(row.starts_with("1-2 "), "{row}");
        assert!(row.contains("0x0000000000000ABC"), "{row}");
        assert!(row.contains("Firmware"), "{row}");
        assert!(row.contains("[#######........]  50%"), "{row}");
        assert!(row.contains("10.0MiB/s"), "{row}");
        assert!(row.contains("0:05"), "{row}");
        assert!(row.ends_with("downloading"), "{row}");
        assert!(b.lines(40).iter().all(|l| l.chars().count() <= 40));
        let ansi = b.render_ansi(80);
        assert!(ansi.starts_with("\x1b[H") && ansi.ends_with("\x1b[J"));
    }

    #[test]
    fn serial_ttys_are_recognised() {
        assert!(is_serial_tty("/dev/ttyS0"));
        assert!(is_serial_tty("/dev/ttyAMA0"));
        assert!(!is_serial_tty("/dev/tty1"));
        assert!(!is_serial_tty("/dev/pts/3"));
    }
}
