//! ASR, the stream that carries the macOS system image to the Mac (protocol.md §8).
//!
//! The device drives: it sends bare XML plists (no length prefix; each ends with `</plist>`,
//! usually followed by a newline) — `Initiate`, any number of `OOBData` reads at offsets it
//! chooses, then `Payload` — and the host answers with a packet-info plist, the raw bytes asked
//! for, and finally the whole image from offset 0 in 131 072-byte chunks, each followed by its
//! SHA-1 when the device asked for checksum chunks.
//!
//! [`CommandParser`] and [`packet_info`] are the sans-IO core; [`stream_image`] drives them over
//! any tokio byte stream (a [`crate::usbmux::edge::MuxStream`] in production). The image is
//! read through [`RandomAccess`] on a blocking thread, at most
//! [`AsrConfig::read_ahead_chunks`] chunks ahead of the stream, so memory stays bounded
//! whatever the image size and disk reads overlap USB writes. Chunks are hashed on that thread
//! too (SHA-1 runs on SHA-NI on x86-64, detected at run time by the `sha1` crate) and their
//! buffers are recycled.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use plist::{Dictionary, Value};

pub use crate::ipsw::RandomAccess;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info, warn};

/// Size of one payload chunk (and of the checksum granule).
pub const CHUNK_SIZE: usize = 131_072;
/// Length of the SHA-1 that follows each chunk when checksum chunks are on.
pub const CHECKSUM_LEN: usize = 20;
/// Longest command plist we accept; real ones are a few hundred bytes.
pub const MAX_COMMAND_LEN: usize = 1024 * 1024;
/// Largest single OOB read we serve; the device reads headers and metadata this way.
pub const MAX_OOB_LEN: u64 = 64 * 1024 * 1024;

/// The image ASR streams: any [`RandomAccess`] source (a local file, a stored IPSW entry from
/// [`crate::ipsw::ZipArchive::stored_owned`], a remote [`crate::ipsw::RemoteFile`]), shared with
/// the read-ahead thread.
pub type ImageSource = Arc<dyn RandomAccess + Send + Sync>;

/// A command from the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AsrCommand {
    Initiate { checksum_chunks: bool },
    OobData { offset: u64, length: u64 },
    Payload,
    Other(String),
}

#[derive(Debug, thiserror::Error)]
pub enum AsrError {
    #[error("the Mac sent an ASR command larger than {MAX_COMMAND_LEN} bytes: the stream is corrupt; restart the restore")]
    CommandTooLarge,
    #[error("the Mac sent a malformed ASR command: {0}")]
    BadCommand(String),
    #[error("the Mac sent ASR command {got:?} where {expected} was expected")]
    Unexpected { got: String, expected: &'static str },
    #[error(
        "the Mac asked for {length} image bytes at offset {offset}, outside the {size}-byte image: \
         the image does not match what this Mac expects (wrong IPSW?)"
    )]
    OobOutOfRange { offset: u64, length: u64, size: u64 },
    #[error("the Mac closed the ASR connection before the image was sent ({0})")]
    Closed(&'static str),
    #[error("the Mac sent no ASR command for {0:?}: it may have stopped the restore; check its screen and the restore log")]
    Timeout(Duration),
    #[error("reading the system image failed at offset {offset}: {source}; check the IPSW file or the download")]
    Source { offset: u64, source: io::Error },
    #[error(
        "writing the system image to the Mac failed at offset {offset} after {retries} retries: \
         {source}; check the cable, then restart the restore"
    )]
    Write {
        offset: u64,
        retries: u32,
        source: io::Error,
    },
    #[error("ASR connection error: {0}")]
    Io(#[from] io::Error),
}

/// Sans-IO splitter of the device's unframed XML command stream.
#[derive(Debug, Default)]
pub struct CommandParser {
    buf: Vec<u8>,
}

const PLIST_END: &[u8] = b"</plist>";

impl CommandParser {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete command, `Ok(None)` if more bytes are needed.
    pub fn next_command(&mut self) -> Result<Option<AsrCommand>, AsrError> {
        let skip = self
            .buf
            .iter()
            .take_while(|c| c.is_ascii_whitespace())
            .count();
        self.buf.drain(..skip);
        let Some(pos) = find(&self.buf, PLIST_END) else {
            if self.buf.len() > MAX_COMMAND_LEN {
                return Err(AsrError::CommandTooLarge);
            }
            return Ok(None);
        };
        let end = pos + PLIST_END.len();
        let body: Vec<u8> = self.buf.drain(..end).collect();
        parse_command(&body).map(Some)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Parses one command plist.
pub fn parse_command(body: &[u8]) -> Result<AsrCommand, AsrError> {
    let value = Value::from_reader_xml(body).map_err(|e| AsrError::BadCommand(e.to_string()))?;
    let dict = value
        .into_dictionary()
        .ok_or_else(|| AsrError::BadCommand("not a dictionary".into()))?;
    let command = dict
        .get("Command")
        .and_then(Value::as_string)
        .ok_or_else(|| AsrError::BadCommand("no Command key".into()))?;
    let uint = |k: &str| {
        dict.get(k)
            .and_then(Value::as_unsigned_integer)
            .ok_or_else(|| AsrError::BadCommand(format!("{command} without a valid {k}")))
    };
    Ok(match command {
        "Initiate" => AsrCommand::Initiate {
            checksum_chunks: dict
                .get("Checksum Chunks")
                .and_then(Value::as_boolean)
                .unwrap_or(false),
        },
        "OOBData" => AsrCommand::OobData {
            offset: uint("OOB Offset")?,
            length: uint("OOB Length")?,
        },
        "Payload" => AsrCommand::Payload,
        other => AsrCommand::Other(other.to_owned()),
    })
}

/// The packet-info plist answering `Initiate` (XML, no length prefix).
pub fn packet_info(image_size: u64, checksum_chunks: bool) -> Vec<u8> {
    let mut d = Dictionary::new();
    if checksum_chunks {
        d.insert(
            "Checksum Chunk Size".into(),
            Value::Integer((CHUNK_SIZE as u64).into()),
        );
    }
    d.insert("FEC Slice Stride".into(), Value::Integer(40.into()));
    d.insert("Packet Payload Size".into(), Value::Integer(1450.into()));
    d.insert("Packets Per FEC".into(), Value::Integer(25.into()));
    let mut payload = Dictionary::new();
    payload.insert("Port".into(), Value::Integer(1.into()));
    payload.insert("Size".into(), Value::Integer(image_size.into()));
    d.insert("Payload".into(), Value::Dictionary(payload));
    d.insert("Stream ID".into(), Value::Integer(1.into()));
    d.insert("Version".into(), Value::Integer(1.into()));
    let mut out = Vec::new();
    // Writing XML into a Vec cannot fail: no I/O error source, all values are plain.
    Value::Dictionary(d)
        .to_writer_xml(&mut out)
        .expect("XML plist into memory");
    out.push(b'\n');
    out
}

/// Tunables of [`stream_image`].
#[derive(Debug, Clone)]
pub struct AsrConfig {
    /// Chunks read ahead of the stream (memory bound: this × 128 KiB).
    pub read_ahead_chunks: usize,
    /// Retries of one chunk write after transient errors (idevicerestore: 10).
    pub max_write_retries: u32,
    pub retry_delay: Duration,
    /// How long to wait for the device's next command.
    pub command_timeout: Duration,
}

impl Default for AsrConfig {
    fn default() -> Self {
        Self {
            read_ahead_chunks: 32,
            max_write_retries: 10,
            retry_delay: Duration::from_millis(200),
            command_timeout: Duration::from_secs(120),
        }
    }
}

/// What a finished stream did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AsrStats {
    pub image_size: u64,
    pub checksum_chunks: bool,
    pub oob_reads: u64,
    pub oob_bytes: u64,
    pub payload_bytes: u64,
    pub write_retries: u32,
}

/// Runs one ASR session: answers commands until `Payload`, then streams the image.
/// `progress(sent, total)` is called after every chunk.
pub async fn stream_image<S>(
    stream: &mut S,
    source: ImageSource,
    config: &AsrConfig,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<AsrStats, AsrError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let size = source.len();
    let mut stats = AsrStats {
        image_size: size,
        ..AsrStats::default()
    };
    let mut parser = CommandParser::new();
    match next_command(stream, &mut parser, config).await? {
        AsrCommand::Initiate { checksum_chunks } => stats.checksum_chunks = checksum_chunks,
        other => {
            return Err(AsrError::Unexpected {
                got: format!("{other:?}"),
                expected: "Initiate",
            })
        }
    }
    info!(
        size,
        checksum = stats.checksum_chunks,
        "ASR session initiated"
    );
    write_retrying(
        stream,
        &packet_info(size, stats.checksum_chunks),
        0,
        config,
        &mut stats,
    )
    .await?;
    stream.flush().await?;
    loop {
        match next_command(stream, &mut parser, config).await? {
            AsrCommand::OobData { offset, length } => {
                let end = offset.checked_add(length);
                if length > MAX_OOB_LEN || end.map_or(true, |e| e > size) {
                    return Err(AsrError::OobOutOfRange {
                        offset,
                        length,
                        size,
                    });
                }
                debug!(offset, length, "ASR OOB read");
                let src = source.clone();
                // Bounded by MAX_OOB_LEN just above.
                let data = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; length as usize];
                    src.read_at(offset, &mut buf).map(|()| buf)
                })
                .await
                .map_err(|e| AsrError::Source {
                    offset,
                    source: io::Error::other(e.to_string()),
                })?
                .map_err(|source| AsrError::Source { offset, source })?;
                write_retrying(stream, &data, offset, config, &mut stats).await?;
                stream.flush().await?;
                stats.oob_reads += 1;
                stats.oob_bytes += length;
            }
            AsrCommand::Initiate { checksum_chunks } => {
                // Seen since iBridgeOS 9: the device restarts negotiation.
                stats.checksum_chunks = checksum_chunks;
                write_retrying(
                    stream,
                    &packet_info(size, checksum_chunks),
                    0,
                    config,
                    &mut stats,
                )
                .await?;
                stream.flush().await?;
            }
            AsrCommand::Payload => break,
            AsrCommand::Other(c) => {
                return Err(AsrError::Unexpected {
                    got: c,
                    expected: "OOBData, Initiate or Payload",
                })
            }
        }
    }
    info!(size, "ASR payload starts");
    send_payload(stream, source, config, &mut stats, progress).await?;
    stream.flush().await?;
    info!(
        bytes = stats.payload_bytes,
        retries = stats.write_retries,
        "ASR payload sent"
    );
    Ok(stats)
}

async fn next_command<S: AsyncRead + Unpin>(
    stream: &mut S,
    parser: &mut CommandParser,
    config: &AsrConfig,
) -> Result<AsrCommand, AsrError> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(c) = parser.next_command()? {
            return Ok(c);
        }
        let n = tokio::time::timeout(config.command_timeout, stream.read(&mut buf))
            .await
            .map_err(|_| AsrError::Timeout(config.command_timeout))??;
        if n == 0 {
            return Err(AsrError::Closed("while waiting for a command"));
        }
        parser.push(&buf[..n]);
    }
}

/// Writes `data` completely, retrying transient failures.
///
/// "Retry" on a byte stream: an `AsyncWrite::poll_write` that returns an error has accepted
/// **no** bytes of that call, and every `Ok(n)` has accepted exactly `n`. So after a failure
/// we resume at the first byte not yet accepted — never from the chunk's start (that would
/// duplicate bytes the device already has and shift every following byte) and never past it
/// (that would skip). Only transient kinds (`Interrupted`, `WouldBlock`, `TimedOut`) are
/// retried; a reset or closed connection cannot be resumed, because ASR has no way to say
/// "continue at offset N" in the payload phase — the device would have to start over.
async fn write_retrying<S: AsyncWrite + Unpin>(
    stream: &mut S,
    data: &[u8],
    offset: u64,
    config: &AsrConfig,
    stats: &mut AsrStats,
) -> Result<(), AsrError> {
    let mut done = 0;
    let mut retries = 0;
    while done < data.len() {
        match stream.write(&data[done..]).await {
            Ok(0) => {
                return Err(AsrError::Write {
                    offset: offset + done as u64,
                    retries,
                    source: io::Error::new(io::ErrorKind::WriteZero, "the connection is closed"),
                })
            }
            Ok(n) => done += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                ) && retries < config.max_write_retries =>
            {
                retries += 1;
                stats.write_retries += 1;
                warn!(
                    offset = offset + done as u64,
                    retries, "ASR write failed, retrying: {e}"
                );
                tokio::time::sleep(config.retry_delay).await;
            }
            Err(source) => {
                return Err(AsrError::Write {
                    offset: offset + done as u64,
                    retries,
                    source,
                })
            }
        }
    }
    Ok(())
}

struct Chunk {
    offset: u64,
    data: Vec<u8>,
    sha1: Option<[u8; CHECKSUM_LEN]>,
}

async fn send_payload<S: AsyncWrite + Unpin>(
    stream: &mut S,
    source: ImageSource,
    config: &AsrConfig,
    stats: &mut AsrStats,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<(), AsrError> {
    let size = source.len();
    let checksum = stats.checksum_chunks;
    let (tx, mut rx) =
        tokio::sync::mpsc::channel::<Result<Chunk, AsrError>>(config.read_ahead_chunks.max(1));
    // Written chunks go back to the reader for reuse: a fresh 128 KiB buffer per chunk is, with
    // musl's allocator, an mmap + page faults + munmap every time.
    let (free_tx, free_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    // Reading and hashing run on a blocking thread; the channel's capacity is the read-ahead,
    // so memory is bounded (at most read-ahead + 2 buffers exist) and the thread stops as soon
    // as the stream side goes away.
    let reader = tokio::task::spawn_blocking(move || {
        let mut offset = 0u64;
        while offset < size {
            // At most CHUNK_SIZE, so it fits usize.
            let len = (size - offset).min(CHUNK_SIZE as u64) as usize;
            let mut data = free_rx.try_recv().unwrap_or_default();
            // `read_at` overwrites every byte, so a recycled buffer's old contents never leak.
            data.resize(len, 0);
            let item = match source.read_at(offset, &mut data) {
                Ok(()) => {
                    let sha1 = checksum.then(|| Sha1::digest(&data).into());
                    Ok(Chunk { offset, data, sha1 })
                }
                Err(source) => Err(AsrError::Source { offset, source }),
            };
            let failed = item.is_err();
            if tx.blocking_send(item).is_err() || failed {
                return;
            }
            offset += len as u64;
        }
    });
    let mut sent = 0u64;
    while let Some(item) = rx.recv().await {
        let chunk = item?;
        write_retrying(stream, &chunk.data, chunk.offset, config, stats).await?;
        if let Some(sha1) = chunk.sha1 {
            write_retrying(stream, &sha1, chunk.offset, config, stats).await?;
        }
        sent += chunk.data.len() as u64;
        stats.payload_bytes = sent;
        progress(sent, size);
        // The reader may have finished already; then the buffer is simply freed.
        let _ = free_tx.send(chunk.data);
    }
    drop(rx);
    // The reader ends on its own once the channel is closed; a panic there is a bug.
    if let Err(e) = reader.await {
        return Err(AsrError::Source {
            offset: sent,
            source: io::Error::other(e.to_string()),
        });
    }
    if sent != size {
        return Err(AsrError::Source {
            offset: sent,
            source: io::Error::new(io::ErrorKind::UnexpectedEof, "image ended early"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(s: &str) -> Vec<u8> {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<plist version=\"1.0\"><dict>{s}</dict></plist>\n"
        )
        .into_bytes()
    }

    #[test]
    fn parser_splits_commands() {
        let mut p = CommandParser::new();
        let mut all =
            cmd("<key>Command</key><string>Initiate</string><key>Checksum Chunks</key><true/>");
        all.extend(cmd(
            "<key>Command</key><string>OOBData</string><key>OOB Offset</key><integer>1024</integer><key>OOB Length</key><integer>512</integer>",
        ));
        all.extend(cmd("<key>Command</key><string>Payload</string>"));
        for b in all.chunks(7) {
            p.push(b);
        }
        assert_eq!(
            p.next_command().unwrap(),
            Some(AsrCommand::Initiate {
                checksum_chunks: true
            })
        );
        assert_eq!(
            p.next_command().unwrap(),
            Some(AsrCommand::OobData {
                offset: 1024,
                length: 512
            })
        );
        assert_eq!(p.next_command().unwrap(), Some(AsrCommand::Payload));
        assert_eq!(p.next_command().unwrap(), None);
    }

    #[test]
    fn parser_errors() {
        let mut p = CommandParser::new();
        p.push(&cmd("<key>Command</key><string>OOBData</string>"));
        assert!(matches!(p.next_command(), Err(AsrError::BadCommand(_))));
        let mut p = CommandParser::new();
        p.push(b"garbage</plist>");
        assert!(matches!(p.next_command(), Err(AsrError::BadCommand(_))));
        let mut p = CommandParser::new();
        p.push(&vec![b'a'; MAX_COMMAND_LEN + 1]);
        assert!(matches!(p.next_command(), Err(AsrError::CommandTooLarge)));
    }

    #[test]
    fn packet_info_shape() {
        let info = packet_info(1 << 33, true);
        let d = Value::from_reader_xml(&info[..])
            .unwrap()
            .into_dictionary()
            .unwrap();
        assert_eq!(
            d.get("Checksum Chunk Size")
                .and_then(Value::as_unsigned_integer),
            Some(131_072)
        );
        let payload = d.get("Payload").and_then(Value::as_dictionary).unwrap();
        assert_eq!(
            payload.get("Size").and_then(Value::as_unsigned_integer),
            Some(1 << 33)
        );
        assert_eq!(d.len(), 7);
        let d = Value::from_reader_xml(&packet_info(5, false)[..])
            .unwrap()
            .into_dictionary()
            .unwrap();
        assert!(d.get("Checksum Chunk Size").is_none());
        assert_eq!(d.len(), 6);
    }
}
