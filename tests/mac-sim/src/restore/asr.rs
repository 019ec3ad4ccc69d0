//! The device side of an ASR session (protocol.md §8): Initiate, packet info, OOB reads,
//! payload with per-chunk SHA-1, every byte compared with the expected image as it arrives
//! (memory stays bounded by one chunk).

use std::time::Duration;

use plist::{Dictionary, Value};
use sha1::{Digest, Sha1};

use super::link::Stream;
use super::scenario::{AsrSpec, ImageSource, ScenarioFaults};

pub const CHUNK: usize = 131_072;

/// What happened to the payload, for reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AsrResult {
    pub bytes: u64,
    pub chunks: u64,
    pub oob_reads: u64,
    pub sha1: String,
}

/// Why the session stopped early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AsrFailure {
    /// The host sent something wrong (reason for the technician).
    Invalid(String),
    /// The connection broke (reset, timeout, off the bus).
    Io(String),
    /// A fault knob fired.
    Fault(String),
}

/// Reads plists without a length prefix and raw bytes from the same stream.
pub struct AsrReader<'a> {
    stream: &'a Stream,
    pending: Vec<u8>,
    timeout: Duration,
}

impl<'a> AsrReader<'a> {
    pub fn new(stream: &'a Stream, timeout: Duration) -> Self {
        AsrReader {
            stream,
            pending: Vec::new(),
            timeout,
        }
    }

    /// One XML plist: everything up to `</plist>` (and one newline right after it, if sent
    /// in the same write).
    pub fn read_plist(&mut self) -> Result<Dictionary, AsrFailure> {
        const END: &[u8] = b"</plist>";
        loop {
            if let Some(i) = find(&self.pending, END) {
                let mut end = i + END.len();
                if self.pending.get(end) == Some(&b'\n') {
                    end += 1;
                }
                let doc: Vec<u8> = self.pending.drain(..end).collect();
                let v: Value = plist::from_bytes(&doc).map_err(|e| {
                    AsrFailure::Invalid(format!("the host's ASR plist does not parse: {e}"))
                })?;
                return v.into_dictionary().ok_or_else(|| {
                    AsrFailure::Invalid("the host's ASR plist is not a dictionary".into())
                });
            }
            if self.pending.len() > 1 << 20 {
                return Err(AsrFailure::Invalid(
                    "the host sent 1 MiB without finishing an ASR plist".into(),
                ));
            }
            let mut buf = [0u8; 4096];
            let n = self
                .stream
                .read_some(&mut buf, self.timeout)
                .map_err(|e| AsrFailure::Io(e.to_string()))?;
            self.pending.extend_from_slice(&buf[..n]);
        }
    }

    pub fn read_raw(&mut self, out: &mut [u8]) -> Result<(), AsrFailure> {
        let n = self.pending.len().min(out.len());
        out[..n].copy_from_slice(&self.pending[..n]);
        self.pending.drain(..n);
        self.stream
            .read_exact_timeout(&mut out[n..], self.timeout)
            .map_err(|e| AsrFailure::Io(e.to_string()))
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// XML plist, no length prefix (§6.6).
pub fn write_plist(stream: &Stream, dict: Dictionary) -> Result<(), AsrFailure> {
    let mut buf = Vec::new();
    plist::to_writer_xml(&mut buf, &Value::Dictionary(dict))
        .map_err(|e| AsrFailure::Io(e.to_string()))?;
    if buf.last() != Some(&b'\n') {
        buf.push(b'\n');
    }
    stream
        .write_all(&buf)
        .map_err(|e| AsrFailure::Io(e.to_string()))
}

fn command(name: &str) -> Dictionary {
    let mut d = Dictionary::new();
    d.insert("Command".into(), Value::String(name.into()));
    d
}

fn uint(d: &Dictionary, key: &str) -> Option<u64> {
    d.get(key).and_then(Value::as_unsigned_integer)
}

fn check_packet_info(d: &Dictionary, checksum: bool, size: u64) -> Result<(), AsrFailure> {
    let mut problems = Vec::new();
    let mut expect = |key: &str, want: u64| {
        if uint(d, key) != Some(want) {
            problems.push(format!("{key} is {:?}, expected {want}", d.get(key)));
        }
    };
    expect("FEC Slice Stride", 40);
    expect("Packet Payload Size", 1450);
    expect("Packets Per FEC", 25);
    expect("Stream ID", 1);
    expect("Version", 1);
    if checksum {
        expect("Checksum Chunk Size", CHUNK as u64);
    }
    match d.get("Payload").and_then(Value::as_dictionary) {
        Some(p) => {
            if uint(p, "Port") != Some(1) {
                problems.push(format!("Payload.Port is {:?}, expected 1", p.get("Port")));
            }
            if uint(p, "Size") != Some(size) {
                problems.push(format!(
                    "Payload.Size is {:?}, the image has {size} bytes",
                    p.get("Size")
                ));
            }
        }
        None => problems.push("Payload dictionary missing".into()),
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(AsrFailure::Invalid(format!(
            "ASR packet info wrong: {}",
            problems.join("; ")
        )))
    }
}

/// Run the sink. `progress` is called with (operation, percent) for ProgressMsg 13/14.
pub fn run(
    stream: &Stream,
    spec: &AsrSpec,
    image: &mut ImageSource,
    faults: &ScenarioFaults,
    mut progress: impl FnMut(u64, i64),
    mut on_disconnect_fault: impl FnMut(),
) -> Result<AsrResult, AsrFailure> {
    let size = image.size();
    let mut r = AsrReader::new(stream, stream.timeout());
    let mut initiate = command("Initiate");
    initiate.insert(
        "Checksum Chunks".into(),
        Value::Boolean(spec.checksum_chunks),
    );
    write_plist(stream, initiate.clone())?;
    check_packet_info(&r.read_plist()?, spec.checksum_chunks, size)?;
    let mut result = AsrResult::default();
    let mut expected = Vec::new();
    let mut got = Vec::new();
    for [off, len] in &spec.oob {
        let off = if *off < 0 {
            size.saturating_sub(off.unsigned_abs())
        } else {
            (*off as u64).min(size)
        };
        let len = (*len as u64).min(size - off) as usize;
        let mut cmd = command("OOBData");
        cmd.insert("OOB Offset".into(), Value::Integer(off.into()));
        cmd.insert("OOB Length".into(), Value::Integer((len as u64).into()));
        write_plist(stream, cmd)?;
        got.resize(len, 0);
        expected.resize(len, 0);
        r.read_raw(&mut got)?;
        image
            .read_at(off, &mut expected)
            .map_err(|e| AsrFailure::Io(format!("reading the expected image: {e}")))?;
        if got != expected {
            let at = got
                .iter()
                .zip(&expected)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Err(AsrFailure::Invalid(format!(
                "OOB read of {len} bytes at offset {off} differs from the image at byte {}",
                off + at as u64
            )));
        }
        result.oob_reads += 1;
    }
    if spec.reinitiate {
        write_plist(stream, initiate)?;
        check_packet_info(&r.read_plist()?, spec.checksum_chunks, size)?;
    }
    write_plist(stream, command("Payload"))?;
    let mut total = Sha1::new();
    let mut done: u64 = 0;
    let mut last_pct = -1;
    got.resize(CHUNK, 0);
    expected.resize(CHUNK, 0);
    while done < size {
        let n = (size - done).min(CHUNK as u64) as usize;
        r.read_raw(&mut got[..n])?;
        image
            .read_at(done, &mut expected[..n])
            .map_err(|e| AsrFailure::Io(format!("reading the expected image: {e}")))?;
        if got[..n] != expected[..n] {
            let at = got
                .iter()
                .zip(&expected)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Err(AsrFailure::Invalid(format!(
                "ASR payload differs from the image at byte {} (chunk {})",
                done + at as u64,
                result.chunks
            )));
        }
        if spec.checksum_chunks {
            let mut sum = [0u8; 20];
            r.read_raw(&mut sum)?;
            let want: [u8; 20] = Sha1::digest(&got[..n]).into();
            if sum != want {
                return Err(AsrFailure::Invalid(format!(
                    "SHA-1 after chunk {} (offset {done}) is {}, the chunk hashes to {}",
                    result.chunks,
                    hex::encode(sum),
                    hex::encode(want)
                )));
            }
        }
        total.update(&got[..n]);
        done += n as u64;
        result.chunks += 1;
        result.bytes = done;
        if faults.disconnect_after_asr_bytes.is_some_and(|b| done >= b) {
            on_disconnect_fault();
            return Err(AsrFailure::Fault(format!(
                "fault: Mac dropped off the bus after {done} ASR bytes"
            )));
        }
        if faults.rst_asr_after_bytes.is_some_and(|b| done >= b) {
            stream.reset("asr: simulated connection reset");
            return Err(AsrFailure::Fault(format!(
                "fault: device reset the ASR connection after {done} bytes"
            )));
        }
        let pct = (done * 100 / size.max(1)) as i64;
        if pct / 10 != last_pct / 10 {
            last_pct = pct;
            progress(13, pct);
        }
    }
    result.sha1 = hex::encode(total.finalize());
    progress(14, 100);
    Ok(result)
}
