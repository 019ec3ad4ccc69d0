//! The small subset of DER that IMG4 containers use (§5.1 of the protocol notes).
//!
//! The reader works on borrowed slices and reports every inconsistency as a [`DerError`]; it
//! never indexes past the input, so arbitrary bytes (truncated downloads, garbage from a
//! broken device) cannot make it panic. Lengths up to four length bytes are accepted because a
//! restore ramdisk IM4P is larger than 100 MB.

use std::ops::Range;

/// Why a DER element could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DerError {
    #[error("DER data ends early at offset {offset}: the file is truncated or not an IMG4 file")]
    Truncated { offset: usize },
    #[error("DER length at offset {offset} uses an unsupported form (indefinite or more than 4 length bytes)")]
    UnsupportedLength { offset: usize },
    #[error("DER tag at offset {offset} is too large for a 32-bit tag number")]
    TagTooLarge { offset: usize },
}

/// The class bits of an identifier octet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Universal,
    Application,
    Context,
    Private,
}

/// A decoded identifier: class, constructed bit and tag number (high-tag-number form folded in).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    pub class: Class,
    pub constructed: bool,
    pub number: u32,
}

impl Tag {
    pub const BOOLEAN: Tag = Tag::universal(false, 1);
    pub const INTEGER: Tag = Tag::universal(false, 2);
    pub const OCTET_STRING: Tag = Tag::universal(false, 4);
    pub const IA5_STRING: Tag = Tag::universal(false, 22);
    pub const SEQUENCE: Tag = Tag::universal(true, 16);
    pub const SET: Tag = Tag::universal(true, 17);

    const fn universal(constructed: bool, number: u32) -> Tag {
        Tag {
            class: Class::Universal,
            constructed,
            number,
        }
    }

    /// `[n]` context-specific, constructed (IMG4 uses `[0]` for the ticket, `[1]` for IM4R).
    pub const fn context(number: u32) -> Tag {
        Tag {
            class: Class::Context,
            constructed: true,
            number,
        }
    }

    /// The private constructed tag IMG4 wraps each 4CC property in.
    pub const fn private_fourcc(fourcc: [u8; 4]) -> Tag {
        Tag {
            class: Class::Private,
            constructed: true,
            number: u32::from_be_bytes(fourcc),
        }
    }

    /// The tag number as a 4CC, for private property tags.
    pub fn fourcc(&self) -> [u8; 4] {
        self.number.to_be_bytes()
    }

    /// Identifier octets in DER form.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let class_bits = match self.class {
            Class::Universal => 0x00,
            Class::Application => 0x40,
            Class::Context => 0x80,
            Class::Private => 0xC0,
        };
        let first = class_bits | if self.constructed { 0x20 } else { 0 };
        if self.number < 0x1F {
            // The check above proves the number fits in the low five bits.
            out.push(first | self.number as u8);
            return;
        }
        out.push(first | 0x1F);
        let mut groups = [0u8; 5];
        let mut n = self.number;
        let mut count = 0;
        loop {
            groups[count] = (n & 0x7F) as u8;
            count += 1;
            n >>= 7;
            if n == 0 {
                break;
            }
        }
        for i in (0..count).rev() {
            let continuation = if i == 0 { 0 } else { 0x80 };
            out.push(groups[i] | continuation);
        }
    }
}

/// One element: its tag and where its header and content lie in the input it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element<'a> {
    pub tag: Tag,
    /// Absolute offset of the identifier octet in the buffer given to [`read_at`].
    pub start: usize,
    /// Absolute range of the content octets.
    pub content_range: Range<usize>,
    /// The content octets.
    pub content: &'a [u8],
    /// Header plus content, exactly as in the input.
    pub raw: &'a [u8],
}

impl<'a> Element<'a> {
    /// Absolute offset just past this element.
    pub fn end(&self) -> usize {
        self.content_range.end
    }

    /// Iterate over the children of a constructed element.
    pub fn children(&self) -> Children<'a> {
        Children {
            buf: self.content,
            base: self.content_range.start,
            pos: 0,
        }
    }
}

/// Read one element starting at `offset` of `buf`; offsets in the result are relative to `buf`.
pub fn read_at(buf: &[u8], offset: usize) -> Result<Element<'_>, DerError> {
    let byte = |i: usize| buf.get(i).copied().ok_or(DerError::Truncated { offset: i });
    let mut pos = offset;
    let first = byte(pos)?;
    pos += 1;
    let class = match first >> 6 {
        0 => Class::Universal,
        1 => Class::Application,
        2 => Class::Context,
        _ => Class::Private,
    };
    let constructed = first & 0x20 != 0;
    let mut number = u32::from(first & 0x1F);
    if number == 0x1F {
        number = 0;
        loop {
            let b = byte(pos)?;
            pos += 1;
            if number > (u32::MAX >> 7) {
                return Err(DerError::TagTooLarge { offset });
            }
            number = (number << 7) | u32::from(b & 0x7F);
            if b & 0x80 == 0 {
                break;
            }
        }
    }
    let len_offset = pos;
    let first_len = byte(pos)?;
    pos += 1;
    let len = if first_len < 0x80 {
        usize::from(first_len)
    } else {
        let count = usize::from(first_len & 0x7F);
        if count == 0 || count > 4 {
            return Err(DerError::UnsupportedLength { offset: len_offset });
        }
        let mut len = 0usize;
        for _ in 0..count {
            len = (len << 8) | usize::from(byte(pos)?);
            pos += 1;
        }
        len
    };
    let end = pos
        .checked_add(len)
        .filter(|&end| end <= buf.len())
        .ok_or(DerError::Truncated { offset: buf.len() })?;
    Ok(Element {
        tag: Tag {
            class,
            constructed,
            number,
        },
        start: offset,
        content_range: pos..end,
        content: &buf[pos..end],
        raw: &buf[offset..end],
    })
}

/// Read the single element at the start of `buf` (trailing bytes are ignored; use
/// [`Element::end`] to detect them).
pub fn read(buf: &[u8]) -> Result<Element<'_>, DerError> {
    read_at(buf, 0)
}

/// Iterator over the children of a constructed element; stops after the first error.
pub struct Children<'a> {
    buf: &'a [u8],
    base: usize,
    pos: usize,
}

impl<'a> Iterator for Children<'a> {
    type Item = Result<Element<'a>, DerError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.buf.len() {
            return None;
        }
        match read_at(self.buf, self.pos) {
            Ok(mut el) => {
                self.pos = el.end();
                el.start += self.base;
                el.content_range =
                    el.content_range.start + self.base..el.content_range.end + self.base;
                Some(Ok(el))
            }
            Err(e) => {
                self.pos = self.buf.len();
                Some(Err(match e {
                    DerError::Truncated { offset } => DerError::Truncated {
                        offset: offset + self.base,
                    },
                    DerError::UnsupportedLength { offset } => DerError::UnsupportedLength {
                        offset: offset + self.base,
                    },
                    DerError::TagTooLarge { offset } => DerError::TagTooLarge {
                        offset: offset + self.base,
                    },
                }))
            }
        }
    }
}

/// Length octets in minimal DER form.
pub fn encode_len(len: usize, out: &mut Vec<u8>) {
    if len < 0x80 {
        // Proven < 0x80 by the branch.
        out.push(len as u8);
        return;
    }
    let bytes = (len as u64).to_be_bytes();
    let skip = bytes.iter().take_while(|&&b| b == 0).count();
    out.push(0x80 | (bytes.len() - skip) as u8);
    out.extend_from_slice(&bytes[skip..]);
}

/// Size of the header (identifier + length octets) for `tag` and a content of `len` bytes.
pub fn header_len(tag: Tag, len: usize) -> usize {
    let mut v = Vec::with_capacity(16);
    tag.encode(&mut v);
    encode_len(len, &mut v);
    v.len()
}

/// Append a whole element.
pub fn write(tag: Tag, content: &[u8], out: &mut Vec<u8>) {
    tag.encode(out);
    encode_len(content.len(), out);
    out.extend_from_slice(content);
}

/// A whole element as a new vector.
pub fn element(tag: Tag, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 8);
    write(tag, content, &mut out);
    out
}

/// A constructed element whose content is the concatenation of `parts`.
pub fn constructed(tag: Tag, parts: &[&[u8]]) -> Vec<u8> {
    element(tag, &parts.concat())
}

/// INTEGER content for a non-negative value (a leading zero keeps the sign bit clear).
pub fn encode_uint(value: u64) -> Vec<u8> {
    let bytes = value.to_be_bytes();
    let skip = bytes.iter().take_while(|&&b| b == 0).count().min(7);
    let mut out = Vec::with_capacity(9);
    if bytes[skip] & 0x80 != 0 {
        out.push(0);
    }
    out.extend_from_slice(&bytes[skip..]);
    out
}

/// INTEGER content as a non-negative value, if it is one that fits in 64 bits.
pub fn decode_uint(content: &[u8]) -> Option<u64> {
    let first = *content.first()?;
    if first & 0x80 != 0 {
        return None;
    }
    let digits: &[u8] = if first == 0 { &content[1..] } else { content };
    if digits.len() > 8 {
        return None;
    }
    Some(
        digits
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)),
    )
}

/// `[PRIVATE 4cc] { SEQUENCE { IA5String 4cc, value } }`, the shape of every IMG4 property.
pub fn property(fourcc: [u8; 4], value: &[u8]) -> Vec<u8> {
    let name = element(Tag::IA5_STRING, &fourcc);
    let seq = constructed(Tag::SEQUENCE, &[&name, value]);
    element(Tag::private_fourcc(fourcc), &seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lengths_round_trip() {
        for len in [
            0usize,
            0x7F,
            0x80,
            0xFF,
            0x100,
            0xFFFF,
            0x1_0000,
            120_000_000,
        ] {
            let mut v = Vec::new();
            Tag::OCTET_STRING.encode(&mut v);
            encode_len(len, &mut v);
            let header = v.len();
            v.resize(header + len, 0xAB);
            let el = read(&v).unwrap();
            assert_eq!(el.tag, Tag::OCTET_STRING);
            assert_eq!(el.content_range, header..header + len);
        }
    }

    #[test]
    fn minimal_length_forms() {
        let enc = |len| {
            let mut v = Vec::new();
            encode_len(len, &mut v);
            v
        };
        assert_eq!(enc(0x7F), [0x7F]);
        assert_eq!(enc(0x80), [0x81, 0x80]);
        assert_eq!(enc(0x100), [0x82, 0x01, 0x00]);
        assert_eq!(enc(0x1_0000), [0x83, 0x01, 0x00, 0x00]);
        assert_eq!(enc(0x0100_0000), [0x84, 0x01, 0x00, 0x00, 0x00]);
    }

    #[test]
    fn private_fourcc_tag_matches_spec_bytes() {
        // 'MANB' as written in real tickets: FF 84 EA 85 9C 42.
        let mut v = Vec::new();
        Tag::private_fourcc(*b"MANB").encode(&mut v);
        assert_eq!(v, [0xFF, 0x84, 0xEA, 0x85, 0x9C, 0x42]);
        v.push(0);
        let el = read(&v).unwrap();
        assert_eq!(el.tag.fourcc(), *b"MANB");
        assert_eq!(el.tag.class, Class::Private);
    }

    #[test]
    fn integers() {
        assert_eq!(encode_uint(0), [0]);
        assert_eq!(encode_uint(0x80), [0, 0x80]);
        assert_eq!(encode_uint(0x8015), [0, 0x80, 0x15]);
        assert_eq!(decode_uint(&[0, 0x80, 0x15]), Some(0x8015));
        assert_eq!(decode_uint(&[0x80]), None);
        assert_eq!(decode_uint(&[]), None);
        assert_eq!(decode_uint(&encode_uint(u64::MAX)), Some(u64::MAX));
    }

    #[test]
    fn malformed_inputs_are_errors() {
        assert_eq!(read(&[]), Err(DerError::Truncated { offset: 0 }));
        assert_eq!(read(&[0x30]), Err(DerError::Truncated { offset: 1 }));
        assert_eq!(
            read(&[0x30, 0x05, 0x00]),
            Err(DerError::Truncated { offset: 3 })
        );
        assert_eq!(
            read(&[0x30, 0x80]),
            Err(DerError::UnsupportedLength { offset: 1 })
        );
        assert_eq!(
            read(&[0x30, 0x85, 1, 1, 1, 1, 1]),
            Err(DerError::UnsupportedLength { offset: 1 })
        );
        assert_eq!(
            read(&[0x30, 0x84, 0xFF]),
            Err(DerError::Truncated { offset: 3 })
        );
        assert_eq!(
            read(&[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01, 0x00]),
            Err(DerError::TagTooLarge { offset: 0 })
        );
        assert!(read(&[0xFF, 0x84]).is_err());
        // Length that would overflow usize arithmetic on 32-bit targets still errors.
        assert!(read(&[0x04, 0x84, 0xFF, 0xFF, 0xFF, 0xFF]).is_err());
    }

    #[test]
    fn children_report_absolute_offsets_and_errors() {
        let v = [0x30, 0x06, 0x02, 0x01, 0x05, 0x04, 0x01, 0xAA];
        let outer = read(&v).unwrap();
        let kids: Vec<_> = outer.children().collect::<Result<_, _>>().unwrap();
        assert_eq!(kids.len(), 2);
        assert_eq!(kids[1].start, 5);
        assert_eq!(kids[1].content_range, 7..8);
        let bad = [0x30, 0x03, 0x02, 0x05, 0x00];
        let outer = read(&bad).unwrap();
        let kids: Vec<_> = outer.children().collect();
        assert_eq!(kids, vec![Err(DerError::Truncated { offset: 5 })]);
    }
}
