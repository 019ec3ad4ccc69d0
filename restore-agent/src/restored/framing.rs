//! restored's wire framing (protocol.md §6.6): a 4-byte big-endian length, then a plist.
//!
//! We send XML (what restored's own clients send); we accept XML or `bplist00`. The codec is
//! sans-IO ([`encode`], [`Decoder`]); [`FramedReader`] and [`write_message`] run it over any
//! tokio byte stream. Nothing here panics on device bytes: every malformed frame is an error.

use plist::{Dictionary, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame we accept or send. Replies such as NORData carry several firmware images
/// (a few MiB); anything near this size from the device is a broken stream, not a message.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024 * 1024;

/// How a plist is encoded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Xml,
    Binary,
}

#[derive(Debug, thiserror::Error)]
pub enum FramingError {
    #[error(
        "the Mac announced a {len}-byte restored message, more than the {max}-byte limit: the \
         data stream is corrupt; restart the restore"
    )]
    TooLarge { len: usize, max: usize },
    #[error("a restored message is neither an XML nor a binary plist (starts with {prefix:02x?})")]
    NotAPlist { prefix: Vec<u8> },
    #[error("a restored message is a malformed plist: {0}")]
    BadPlist(String),
    #[error("a restored message is a plist but not a dictionary")]
    NotADictionary,
    #[error("cannot encode a message for the Mac: {0}")]
    Encode(String),
    #[error(
        "the connection to the Mac ended in the middle of a message ({got} of {want} bytes): the \
         Mac rebooted or the cable was pulled"
    )]
    Truncated { got: usize, want: usize },
    #[error("I/O error on the connection to the Mac: {0}")]
    Io(#[from] std::io::Error),
}

/// Serializes `dict` as a plist in `encoding` (no length prefix).
pub fn to_plist_bytes(dict: &Dictionary, encoding: Encoding) -> Result<Vec<u8>, FramingError> {
    let mut out = Vec::new();
    let value = Value::Dictionary(dict.clone());
    match encoding {
        Encoding::Xml => value.to_writer_xml(&mut out),
        Encoding::Binary => value.to_writer_binary(&mut out),
    }
    .map_err(|e| FramingError::Encode(e.to_string()))?;
    Ok(out)
}

/// Parses one plist body (no length prefix), XML or binary, that must be a dictionary.
pub fn parse_plist(body: &[u8]) -> Result<Dictionary, FramingError> {
    let trimmed = trim_leading_whitespace(body);
    let binary = trimmed.starts_with(b"bplist00");
    let xml = trimmed.starts_with(b"<?xml") || trimmed.starts_with(b"<plist");
    if !binary && !xml {
        return Err(FramingError::NotAPlist {
            prefix: body.iter().take(8).copied().collect(),
        });
    }
    let value = Value::from_reader(std::io::Cursor::new(trimmed))
        .map_err(|e| FramingError::BadPlist(e.to_string()))?;
    match value {
        Value::Dictionary(d) => Ok(d),
        _ => Err(FramingError::NotADictionary),
    }
}

fn trim_leading_whitespace(b: &[u8]) -> &[u8] {
    let skip = b.iter().take_while(|c| c.is_ascii_whitespace()).count();
    &b[skip..]
}

/// One complete frame: length prefix + plist.
pub fn encode(dict: &Dictionary, encoding: Encoding) -> Result<Vec<u8>, FramingError> {
    let body = to_plist_bytes(dict, encoding)?;
    if body.len() > MAX_MESSAGE_LEN {
        return Err(FramingError::TooLarge {
            len: body.len(),
            max: MAX_MESSAGE_LEN,
        });
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    // Fits: checked against MAX_MESSAGE_LEN (< 4 GiB) just above.
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Sans-IO frame decoder: feed bytes with [`Decoder::push`], take messages with
/// [`Decoder::next_message`].
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    max: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new(MAX_MESSAGE_LEN)
    }
}

impl Decoder {
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet part of a returned message.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Bytes still needed before the next message can be complete (at least 1 if unknown).
    fn wanted(&self) -> usize {
        if self.buf.len() < 4 {
            return 4 - self.buf.len();
        }
        let len = self.frame_len();
        (4 + len).saturating_sub(self.buf.len()).max(1)
    }

    fn frame_len(&self) -> usize {
        u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize
    }

    /// The next complete message, `Ok(None)` if more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<Dictionary>, FramingError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = self.frame_len();
        if len > self.max {
            return Err(FramingError::TooLarge { len, max: self.max });
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let result = parse_plist(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        result.map(Some)
    }
}

/// Reads frames from a byte stream. Cancel-safe: bytes read so far stay in the decoder, so a
/// `select!` that drops [`FramedReader::read_message`] loses nothing.
#[derive(Debug)]
pub struct FramedReader<R> {
    inner: R,
    decoder: Decoder,
}

impl<R: AsyncRead + Unpin> FramedReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            decoder: Decoder::default(),
        }
    }

    pub fn with_max(inner: R, max: usize) -> Self {
        Self {
            inner,
            decoder: Decoder::new(max),
        }
    }

    /// The next message; `Ok(None)` on a clean end of stream between messages.
    pub async fn read_message(&mut self) -> Result<Option<Dictionary>, FramingError> {
        loop {
            if let Some(msg) = self.decoder.next_message()? {
                return Ok(Some(msg));
            }
            let want = self.decoder.wanted().min(64 * 1024);
            let mut chunk = vec![0u8; want];
            let n = self.inner.read(&mut chunk).await?;
            if n == 0 {
                let got = self.decoder.buffered();
                if got == 0 {
                    return Ok(None);
                }
                return Err(FramingError::Truncated {
                    got,
                    want: got + self.decoder.wanted(),
                });
            }
            self.decoder.push(&chunk[..n]);
        }
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// Writes one framed message and flushes.
pub async fn write_message<W: AsyncWrite + Unpin>(
    w: &mut W,
    dict: &Dictionary,
    encoding: Encoding,
) -> Result<(), FramingError> {
    let frame = encode(dict, encoding)?;
    w.write_all(&frame).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dict(pairs: &[(&str, Value)]) -> Dictionary {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn xml_round_trip_and_prefix() {
        let d = dict(&[("Request", Value::String("QueryType".into()))]);
        let frame = encode(&d, Encoding::Xml).unwrap();
        let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - 4);
        assert!(frame[4..].starts_with(b"<?xml"));
        let mut dec = Decoder::default();
        // Byte by byte: no message until the last byte.
        for (i, b) in frame.iter().enumerate() {
            dec.push(&[*b]);
            let m = dec.next_message().unwrap();
            assert_eq!(m.is_some(), i == frame.len() - 1);
            if let Some(m) = m {
                assert_eq!(m, d);
            }
        }
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn binary_accepted() {
        let d = dict(&[("MsgType", Value::String("ProgressMsg".into()))]);
        let frame = encode(&d, Encoding::Binary).unwrap();
        assert!(frame[4..].starts_with(b"bplist00"));
        let mut dec = Decoder::default();
        dec.push(&frame);
        dec.push(&frame);
        assert_eq!(dec.next_message().unwrap().unwrap(), d);
        assert_eq!(dec.next_message().unwrap().unwrap(), d);
        assert!(dec.next_message().unwrap().is_none());
    }

    #[test]
    fn malformed_frames_are_errors() {
        let mut dec = Decoder::new(100);
        dec.push(&1000u32.to_be_bytes());
        assert!(matches!(
            dec.next_message(),
            Err(FramingError::TooLarge {
                len: 1000,
                max: 100
            })
        ));

        let mut dec = Decoder::default();
        dec.push(&5u32.to_be_bytes());
        dec.push(b"hello");
        assert!(matches!(
            dec.next_message(),
            Err(FramingError::NotAPlist { .. })
        ));
        // The bad frame is consumed; the stream can continue.
        assert!(dec.next_message().unwrap().is_none());

        let bad = b"<?xml version=\"1.0\"?><plist><dict><key>a</key>";
        let mut dec = Decoder::default();
        dec.push(&(bad.len() as u32).to_be_bytes());
        dec.push(bad);
        assert!(matches!(dec.next_message(), Err(FramingError::BadPlist(_))));

        let arr = b"<?xml version=\"1.0\"?><plist><array/></plist>";
        let mut dec = Decoder::default();
        dec.push(&(arr.len() as u32).to_be_bytes());
        dec.push(arr);
        assert!(matches!(
            dec.next_message(),
            Err(FramingError::NotADictionary)
        ));

        let mut dec = Decoder::default();
        dec.push(&8u32.to_be_bytes());
        dec.push(b"bplist00");
        assert!(matches!(dec.next_message(), Err(FramingError::BadPlist(_))));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic sweep; the fuzz target covers this properly.
        let mut x: u32 = 12345;
        for _ in 0..2000 {
            let mut bytes = Vec::new();
            let len = (x % 64) as usize;
            bytes.extend_from_slice(&(len as u32).to_be_bytes());
            for _ in 0..len {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                bytes.push((x >> 16) as u8);
            }
            if x % 3 == 0 {
                bytes[4..]
                    .iter_mut()
                    .take(8)
                    .zip(b"bplist00")
                    .for_each(|(a, b)| *a = *b);
            }
            let mut dec = Decoder::default();
            dec.push(&bytes);
            let _ = dec.next_message();
        }
    }

    #[tokio::test]
    async fn reader_reports_truncation_and_clean_eof() {
        let d = dict(&[("A", Value::Integer(1.into()))]);
        let frame = encode(&d, Encoding::Xml).unwrap();
        let mut r = FramedReader::new(&frame[..]);
        assert_eq!(r.read_message().await.unwrap().unwrap(), d);
        assert!(r.read_message().await.unwrap().is_none());

        let mut r = FramedReader::new(&frame[..frame.len() - 3]);
        assert!(matches!(
            r.read_message().await,
            Err(FramingError::Truncated { .. })
        ));
    }
}
