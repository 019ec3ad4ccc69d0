//! IMG4 containers as the simulated iBoot reads them, and a writer for the test images it is fed.
//!
//! Layout (protocol.md §5): `IMG4 = SEQUENCE { "IMG4", IM4P, [0] IM4M, [1] IM4R? }`,
//! `IM4P = SEQUENCE { "IM4P", type 4CC, description, OCTET STRING payload, … }`,
//! `IM4M = SEQUENCE { "IM4M", INTEGER 0, SET { MANB }, signature?, certificates? }`.
//! Manifest and restore properties are private-tagged (`0xFF` + base-128 4CC, §5.1) wrappers
//! around `SEQUENCE { IA5String 4cc, value }`.
//!
//! The reader borrows from the input and never panics: every length is checked against what is
//! left, nesting is bounded, and long-form lengths of up to 4 bytes are accepted because restore
//! ramdisks exceed 100 MB. It is lenient about non-minimal lengths (it only has to understand what
//! a host sends); the writer always emits minimal DER.

use std::fmt;

use sha2::{Digest, Sha384};

/// Why a blob is not the IMG4 structure it should be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Img4Error {
    #[error("DER is truncated at offset {0}: the image was not uploaded completely")]
    Truncated(usize),
    #[error("malformed DER: {0}")]
    Malformed(String),
    #[error("expected {expected}, found {found}")]
    Unexpected {
        expected: &'static str,
        found: String,
    },
}

/// A four-character code (`ibss`, `rkrn`, `MANP`, `OS\0\0` …), compared as raw bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FourCc(pub [u8; 4]);

impl FourCc {
    /// `None` unless `s` is exactly four bytes.
    pub fn parse(s: &str) -> Option<FourCc> {
        <[u8; 4]>::try_from(s.as_bytes()).ok().map(FourCc)
    }

    pub fn as_u32(self) -> u32 {
        u32::from_be_bytes(self.0)
    }

    pub fn from_u32(v: u32) -> FourCc {
        FourCc(v.to_be_bytes())
    }
}

impl fmt::Display for FourCc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in &self.0 {
            if b.is_ascii_graphic() {
                write!(f, "{}", b as char)?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for FourCc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FourCc({self})")
    }
}

/// A DER tag: class (0 universal, 1 application, 2 context, 3 private), constructed bit, number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    pub class: u8,
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
            class: 0,
            constructed,
            number,
        }
    }

    /// `[n]` context-specific, constructed (`0xA0 + n` for small n).
    pub const fn context(number: u32) -> Tag {
        Tag {
            class: 2,
            constructed: true,
            number,
        }
    }

    /// The private constructed tag Apple uses to wrap a 4CC property.
    pub const fn private(fourcc: FourCc) -> Tag {
        Tag {
            class: 3,
            constructed: true,
            number: u32::from_be_bytes(fourcc.0),
        }
    }
}

/// One DER element as found in the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tlv<'a> {
    pub tag: Tag,
    /// The value bytes.
    pub content: &'a [u8],
    /// The whole encoding: tag, length and content.
    pub raw: &'a [u8],
}

/// Sequential reader over concatenated DER elements. `base` keeps offsets in errors absolute.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    base: usize,
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8], base: usize) -> Self {
        Reader { data, pos: 0, base }
    }

    fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    fn byte(&mut self) -> Result<u8, Img4Error> {
        let b = *self
            .data
            .get(self.pos)
            .ok_or(Img4Error::Truncated(self.base + self.pos))?;
        self.pos += 1;
        Ok(b)
    }

    fn next(&mut self) -> Result<Tlv<'a>, Img4Error> {
        let start = self.pos;
        let first = self.byte()?;
        let class = first >> 6;
        let constructed = first & 0x20 != 0;
        let mut number = u32::from(first & 0x1F);
        if number == 0x1F {
            // High tag number: base-128, at most 5 groups for a 32-bit value (§5.1).
            number = 0;
            for i in 0.. {
                if i == 5 {
                    return Err(Img4Error::Malformed(format!(
                        "tag at offset {} is longer than 32 bits",
                        self.base + start
                    )));
                }
                let b = self.byte()?;
                if number > (u32::MAX >> 7) {
                    return Err(Img4Error::Malformed(format!(
                        "tag at offset {} overflows 32 bits",
                        self.base + start
                    )));
                }
                number = (number << 7) | u32::from(b & 0x7F);
                if b & 0x80 == 0 {
                    break;
                }
            }
        }
        let first_len = self.byte()?;
        let len = match first_len {
            0..=0x7F => usize::from(first_len),
            0x80 => {
                return Err(Img4Error::Malformed(format!(
                    "indefinite length at offset {} is not DER",
                    self.base + start
                )))
            }
            0x81..=0x84 => {
                let mut l = 0usize;
                for _ in 0..(first_len & 0x7F) {
                    l = (l << 8) | usize::from(self.byte()?);
                }
                l
            }
            _ => {
                return Err(Img4Error::Malformed(format!(
                    "length at offset {} uses more than 4 bytes",
                    self.base + start
                )))
            }
        };
        let content_start = self.pos;
        let end = content_start
            .checked_add(len)
            .filter(|&e| e <= self.data.len())
            .ok_or(Img4Error::Truncated(self.base + self.data.len()))?;
        self.pos = end;
        Ok(Tlv {
            tag: Tag {
                class,
                constructed,
                number,
            },
            content: &self.data[content_start..end],
            raw: &self.data[start..end],
        })
    }

    fn expect(&mut self, tag: Tag, what: &'static str) -> Result<Tlv<'a>, Img4Error> {
        let t = self.next()?;
        if t.tag != tag {
            return Err(Img4Error::Unexpected {
                expected: what,
                found: format!("tag {:?}", t.tag),
            });
        }
        Ok(t)
    }

    fn ia5(&mut self, what: &'static str) -> Result<&'a str, Img4Error> {
        let t = self.expect(Tag::IA5_STRING, what)?;
        ia5_str(t.content)
    }

    fn finish(&self, what: &'static str) -> Result<(), Img4Error> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(Img4Error::Malformed(format!(
                "{} trailing bytes after {what}",
                self.data.len() - self.pos
            )))
        }
    }
}

fn ia5_str(b: &[u8]) -> Result<&str, Img4Error> {
    if !b.is_ascii() {
        return Err(Img4Error::Malformed(
            "IA5String holds non-ASCII bytes".into(),
        ));
    }
    // ASCII is valid UTF-8, so this cannot fail; map it anyway rather than unwrap.
    std::str::from_utf8(b).map_err(|e| Img4Error::Malformed(e.to_string()))
}

/// Read exactly one DER element spanning all of `data`.
pub fn read_single(data: &[u8]) -> Result<Tlv<'_>, Img4Error> {
    let mut r = Reader::new(data, 0);
    let t = r.next()?;
    r.finish("the outer element")?;
    Ok(t)
}

fn read_uint(content: &[u8]) -> Option<u64> {
    match content {
        [] => None,
        [first, ..] if first & 0x80 != 0 => None,
        _ => {
            let trimmed = match content {
                [0, rest @ ..] => rest,
                _ => content,
            };
            if trimmed.len() > 8 {
                return None;
            }
            Some(trimmed.iter().fold(0u64, |a, &b| (a << 8) | u64::from(b)))
        }
    }
}

/// A manifest/restore property value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value<'a> {
    /// A non-negative INTEGER that fits 64 bits.
    Integer(u64),
    Boolean(bool),
    /// OCTET STRING.
    Data(&'a [u8]),
    /// IA5String.
    String(&'a str),
    /// A SET of nested properties (MANB, MANP, per-component objects).
    Set(Vec<Property<'a>>),
    /// Anything else, kept raw (big integers, unexpected types, nesting beyond the limit).
    Other(Tlv<'a>),
}

/// `[PRIVATE 4cc] { SEQUENCE { IA5String 4cc, value } }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Property<'a> {
    pub fourcc: FourCc,
    pub value: Value<'a>,
}

impl<'a> Property<'a> {
    pub fn as_set(&self) -> Option<&[Property<'a>]> {
        match &self.value {
            Value::Set(s) => Some(s),
            _ => None,
        }
    }
}

/// Look a property up by 4CC in a property list.
pub fn find<'p, 'a>(props: &'p [Property<'a>], fourcc: &str) -> Option<&'p Property<'a>> {
    let f = FourCc::parse(fourcc)?;
    props.iter().find(|p| p.fourcc == f)
}

/// Nesting real tickets use: MANB > MANP/object > value. Deeper SETs are kept raw so crafted
/// input cannot recurse without bound.
const MAX_DEPTH: usize = 4;

fn parse_value(t: Tlv<'_>, depth: usize) -> Result<Value<'_>, Img4Error> {
    Ok(match t.tag {
        Tag::INTEGER => match read_uint(t.content) {
            Some(v) => Value::Integer(v),
            None => Value::Other(t),
        },
        Tag::BOOLEAN => match t.content {
            [b] => Value::Boolean(*b != 0),
            _ => return Err(Img4Error::Malformed("BOOLEAN is not one byte".into())),
        },
        Tag::OCTET_STRING => Value::Data(t.content),
        Tag::IA5_STRING => Value::String(ia5_str(t.content)?),
        Tag::SET if depth < MAX_DEPTH => Value::Set(parse_properties(t.content, depth + 1)?),
        _ => Value::Other(t),
    })
}

fn parse_property(t: Tlv<'_>, depth: usize) -> Result<Property<'_>, Img4Error> {
    if t.tag.class != 3 || !t.tag.constructed {
        return Err(Img4Error::Unexpected {
            expected: "a private-tagged 4CC property",
            found: format!("tag {:?}", t.tag),
        });
    }
    let tag_cc = FourCc::from_u32(t.tag.number);
    let mut outer = Reader::new(t.content, 0);
    let seq = outer.expect(Tag::SEQUENCE, "the property's SEQUENCE")?;
    outer.finish("a property")?;
    let mut r = Reader::new(seq.content, 0);
    let name = r.expect(Tag::IA5_STRING, "the property's 4CC name")?;
    let name_cc = <[u8; 4]>::try_from(name.content)
        .map(FourCc)
        .map_err(|_| Img4Error::Malformed("property name is not 4 characters".into()))?;
    if name_cc != tag_cc {
        return Err(Img4Error::Malformed(format!(
            "property tagged {tag_cc} is named {name_cc}"
        )));
    }
    let value = parse_value(r.next()?, depth)?;
    r.finish("a property value")?;
    Ok(Property {
        fourcc: name_cc,
        value,
    })
}

fn parse_properties(content: &[u8], depth: usize) -> Result<Vec<Property<'_>>, Img4Error> {
    let mut r = Reader::new(content, 0);
    let mut out = Vec::new();
    while !r.is_empty() {
        out.push(parse_property(r.next()?, depth)?);
    }
    Ok(out)
}

/// An image payload with its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Im4p<'a> {
    /// The IM4P's whole DER encoding (what the ticket's DGST covers).
    pub raw: &'a [u8],
    pub fourcc: FourCc,
    pub description: &'a str,
    pub payload: &'a [u8],
}

impl<'a> Im4p<'a> {
    /// Parse a standalone IM4P (nothing may follow it).
    pub fn parse(data: &'a [u8]) -> Result<Im4p<'a>, Img4Error> {
        Im4p::from_tlv(read_single(data)?)
    }

    fn from_tlv(t: Tlv<'a>) -> Result<Im4p<'a>, Img4Error> {
        if t.tag != Tag::SEQUENCE {
            return Err(Img4Error::Unexpected {
                expected: "an IM4P SEQUENCE",
                found: format!("tag {:?}", t.tag),
            });
        }
        let mut r = Reader::new(t.content, 0);
        let magic = r.ia5("the IM4P magic")?;
        if magic != "IM4P" {
            return Err(Img4Error::Unexpected {
                expected: "\"IM4P\"",
                found: format!("{magic:?}"),
            });
        }
        let ty = r.expect(Tag::IA5_STRING, "the IM4P type")?;
        let fourcc = <[u8; 4]>::try_from(ty.content)
            .map(FourCc)
            .map_err(|_| Img4Error::Malformed("IM4P type is not 4 characters".into()))?;
        let description = r.ia5("the IM4P description")?;
        let payload = r.expect(Tag::OCTET_STRING, "the IM4P payload")?.content;
        // Later elements (KBAG, compression info) are allowed but must be well-formed.
        while !r.is_empty() {
            r.next()?;
        }
        Ok(Im4p {
            raw: t.raw,
            fourcc,
            description,
            payload,
        })
    }

    /// SHA-384 of the whole IM4P: what a ticket's `DGST` for this component holds.
    pub fn digest(&self) -> [u8; 48] {
        Sha384::digest(self.raw).into()
    }
}

/// A ticket (manifest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Im4m<'a> {
    pub raw: &'a [u8],
    pub version: u64,
    /// Encoding of the `SET { MANB }` element: what a signature covers.
    pub signed_set: &'a [u8],
    /// Content of MANB: `MANP` and one object per component 4CC.
    pub manifest: Vec<Property<'a>>,
    /// The signature OCTET STRING, when present.
    pub signature: Option<&'a [u8]>,
    /// The certificate chain element (raw), when present.
    pub certificates: Option<&'a [u8]>,
}

impl<'a> Im4m<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Im4m<'a>, Img4Error> {
        Im4m::from_tlv(read_single(data)?)
    }

    fn from_tlv(t: Tlv<'a>) -> Result<Im4m<'a>, Img4Error> {
        if t.tag != Tag::SEQUENCE {
            return Err(Img4Error::Unexpected {
                expected: "an IM4M SEQUENCE",
                found: format!("tag {:?}", t.tag),
            });
        }
        let mut r = Reader::new(t.content, 0);
        let magic = r.ia5("the IM4M magic")?;
        if magic != "IM4M" {
            return Err(Img4Error::Unexpected {
                expected: "\"IM4M\"",
                found: format!("{magic:?}"),
            });
        }
        let version = read_uint(r.expect(Tag::INTEGER, "the IM4M version")?.content)
            .ok_or_else(|| Img4Error::Malformed("IM4M version is not a small integer".into()))?;
        let set = r.expect(Tag::SET, "the IM4M SET")?;
        let top = parse_properties(set.content, 1)?;
        let manifest = match top.as_slice() {
            [p] if p.fourcc == FourCc(*b"MANB") => match &p.value {
                Value::Set(s) => s.clone(),
                _ => return Err(Img4Error::Malformed("MANB is not a SET".into())),
            },
            _ => {
                return Err(Img4Error::Unexpected {
                    expected: "exactly one MANB in the IM4M SET",
                    found: format!("{:?}", top.iter().map(|p| p.fourcc).collect::<Vec<_>>()),
                })
            }
        };
        let mut signature = None;
        let mut certificates = None;
        if !r.is_empty() {
            signature = Some(r.expect(Tag::OCTET_STRING, "the IM4M signature")?.content);
        }
        if !r.is_empty() {
            certificates = Some(r.next()?.raw);
        }
        r.finish("the IM4M")?;
        Ok(Im4m {
            raw: t.raw,
            version,
            signed_set: set.raw,
            manifest,
            signature,
            certificates,
        })
    }

    /// Global manifest properties (`BORD`, `CHIP`, `ECID` …).
    pub fn manp(&self) -> Option<&[Property<'a>]> {
        find(&self.manifest, "MANP").and_then(Property::as_set)
    }

    /// Properties of the object for one component 4CC (`DGST`, `EPRO` …).
    pub fn object(&self, fourcc: FourCc) -> Option<&[Property<'a>]> {
        self.manifest
            .iter()
            .find(|p| p.fourcc == fourcc)
            .and_then(Property::as_set)
    }

    pub fn manp_uint(&self, name: &str) -> Option<u64> {
        match find(self.manp()?, name)?.value {
            Value::Integer(v) => Some(v),
            _ => None,
        }
    }

    pub fn manp_data(&self, name: &str) -> Option<&'a [u8]> {
        match find(self.manp()?, name)?.value {
            Value::Data(d) => Some(d),
            _ => None,
        }
    }

    /// The `DGST` recorded for `fourcc`.
    pub fn digest_of(&self, fourcc: FourCc) -> Option<&'a [u8]> {
        match find(self.object(fourcc)?, "DGST")?.value {
            Value::Data(d) => Some(d),
            _ => None,
        }
    }
}

/// Restore properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Im4r<'a> {
    pub raw: &'a [u8],
    pub properties: Vec<Property<'a>>,
}

impl<'a> Im4r<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Im4r<'a>, Img4Error> {
        Im4r::from_tlv(read_single(data)?)
    }

    fn from_tlv(t: Tlv<'a>) -> Result<Im4r<'a>, Img4Error> {
        if t.tag != Tag::SEQUENCE {
            return Err(Img4Error::Unexpected {
                expected: "an IM4R SEQUENCE",
                found: format!("tag {:?}", t.tag),
            });
        }
        let mut r = Reader::new(t.content, 0);
        let magic = r.ia5("the IM4R magic")?;
        if magic != "IM4R" {
            return Err(Img4Error::Unexpected {
                expected: "\"IM4R\"",
                found: format!("{magic:?}"),
            });
        }
        let set = r.expect(Tag::SET, "the IM4R SET")?;
        r.finish("the IM4R")?;
        Ok(Im4r {
            raw: t.raw,
            properties: parse_properties(set.content, 1)?,
        })
    }
}

/// A stitched image as sent to iBoot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Img4<'a> {
    pub im4p: Im4p<'a>,
    pub im4m: Option<Im4m<'a>>,
    pub im4r: Option<Im4r<'a>>,
}

impl<'a> Img4<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Img4<'a>, Img4Error> {
        let outer = read_single(data)?;
        if outer.tag != Tag::SEQUENCE {
            return Err(Img4Error::Unexpected {
                expected: "an IMG4 SEQUENCE",
                found: format!("tag {:?}", outer.tag),
            });
        }
        let mut r = Reader::new(outer.content, 0);
        let magic = r.ia5("the IMG4 magic")?;
        if magic != "IMG4" {
            return Err(Img4Error::Unexpected {
                expected: "\"IMG4\"",
                found: format!("{magic:?}"),
            });
        }
        let im4p = Im4p::from_tlv(r.next()?)?;
        let mut im4m = None;
        let mut im4r = None;
        while !r.is_empty() {
            let t = r.next()?;
            let inner = |what| -> Result<Tlv<'a>, Img4Error> {
                let mut ir = Reader::new(t.content, 0);
                let x = ir.next()?;
                ir.finish(what)?;
                Ok(x)
            };
            match t.tag {
                tag if tag == Tag::context(0) && im4m.is_none() && im4r.is_none() => {
                    im4m = Some(Im4m::from_tlv(inner("the [0] ticket")?)?)
                }
                tag if tag == Tag::context(1) && im4r.is_none() => {
                    im4r = Some(Im4r::from_tlv(inner("the [1] restore info")?)?)
                }
                other => {
                    return Err(Img4Error::Unexpected {
                        expected: "[0] IM4M or [1] IM4R after the IM4P",
                        found: format!("tag {other:?}"),
                    })
                }
            }
        }
        Ok(Img4 { im4p, im4m, im4r })
    }
}

// ---------------------------------------------------------------------------------------------
// Writer

fn push_tag(out: &mut Vec<u8>, tag: Tag) {
    let head = (tag.class << 6) | if tag.constructed { 0x20 } else { 0 };
    if tag.number < 0x1F {
        // number < 31 fits in the low five bits.
        out.push(head | tag.number as u8);
        return;
    }
    out.push(head | 0x1F);
    let mut groups = Vec::with_capacity(5);
    let mut n = tag.number;
    loop {
        groups.push((n & 0x7F) as u8);
        n >>= 7;
        if n == 0 {
            break;
        }
    }
    let last = groups.len() - 1;
    for (i, g) in groups.iter().rev().enumerate() {
        out.push(if i < last { g | 0x80 } else { *g });
    }
}

fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
        return;
    }
    let bytes = (len as u64).to_be_bytes();
    let skip = bytes.iter().take_while(|&&b| b == 0).count();
    out.push(0x80 | (8 - skip) as u8);
    out.extend_from_slice(&bytes[skip..]);
}

/// Encode one element.
pub fn encode(tag: Tag, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 12);
    push_tag(&mut out, tag);
    push_len(&mut out, content.len());
    out.extend_from_slice(content);
    out
}

fn encode_uint(v: u64) -> Vec<u8> {
    let bytes = v.to_be_bytes();
    let skip = bytes.iter().take(7).take_while(|&&b| b == 0).count();
    let mut c = bytes[skip..].to_vec();
    if c[0] & 0x80 != 0 {
        c.insert(0, 0);
    }
    encode(Tag::INTEGER, &c)
}

/// An owned property value for building manifests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PropValue {
    Integer(u64),
    Boolean(bool),
    Data(Vec<u8>),
    String(String),
    Set(Vec<(FourCc, PropValue)>),
}

fn encode_value(v: &PropValue) -> Vec<u8> {
    match v {
        PropValue::Integer(i) => encode_uint(*i),
        PropValue::Boolean(b) => encode(Tag::BOOLEAN, &[if *b { 0xFF } else { 0 }]),
        PropValue::Data(d) => encode(Tag::OCTET_STRING, d),
        PropValue::String(s) => encode(Tag::IA5_STRING, s.as_bytes()),
        PropValue::Set(items) => encode_set(items),
    }
}

/// DER SET OF: elements sorted by encoding. For 4CC properties (all 5-byte tags) that equals
/// sorting by 4CC, as Apple's tickets are.
fn encode_set(items: &[(FourCc, PropValue)]) -> Vec<u8> {
    let mut encoded: Vec<Vec<u8>> = items
        .iter()
        .map(|(cc, v)| encode_property(*cc, v))
        .collect();
    encoded.sort();
    encode(Tag::SET, &encoded.concat())
}

/// `[PRIVATE 4cc] { SEQUENCE { IA5String 4cc, value } }`.
pub fn encode_property(fourcc: FourCc, value: &PropValue) -> Vec<u8> {
    let mut seq = encode(Tag::IA5_STRING, &fourcc.0);
    seq.extend(encode_value(value));
    encode(Tag::private(fourcc), &encode(Tag::SEQUENCE, &seq))
}

/// `SEQUENCE { "IM4P", type, description, OCTET STRING payload }`.
pub fn build_im4p(fourcc: FourCc, description: &str, payload: &[u8]) -> Vec<u8> {
    let mut c = encode(Tag::IA5_STRING, b"IM4P");
    c.extend(encode(Tag::IA5_STRING, &fourcc.0));
    c.extend(encode(Tag::IA5_STRING, description.as_bytes()));
    c.extend(encode(Tag::OCTET_STRING, payload));
    encode(Tag::SEQUENCE, &c)
}

/// `SEQUENCE { "IM4M", INTEGER 0, SET { MANB { SET manb } }, OCTET STRING sign(SET), certificates }`.
/// `sign` gets the DER of the `SET { MANB }` element (what a signature covers, see
/// [`Im4m::signed_set`]); `certificates` is appended raw (nothing when empty).
pub fn build_im4m_with(
    manb: Vec<(FourCc, PropValue)>,
    sign: impl FnOnce(&[u8]) -> Vec<u8>,
    certificates: &[u8],
) -> Vec<u8> {
    let set = encode_set(&[(FourCc(*b"MANB"), PropValue::Set(manb))]);
    let mut c = encode(Tag::IA5_STRING, b"IM4M");
    c.extend(encode_uint(0));
    c.extend_from_slice(&set);
    c.extend(encode(Tag::OCTET_STRING, &sign(&set)));
    c.extend_from_slice(certificates);
    encode(Tag::SEQUENCE, &c)
}

/// A ticket in its simplest form: every component gets `EPRO`/`ESEC` = production/security, no
/// nonce. [`crate::ticket::TicketSpec`] is the full form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketSpec {
    pub chip: u32,
    pub board: u32,
    /// 0 = valid for any ECID (simulator convention).
    pub ecid: u64,
    pub security_domain: u32,
    pub production: bool,
    pub security: bool,
    /// Component 4CC → SHA-384 of its IM4P.
    pub digests: Vec<(FourCc, Vec<u8>)>,
}

/// An IM4M signed with the simulator's test key, which the simulated Mac trusts (see
/// [`crate::ticket`] for the layout and key).
pub fn build_im4m(t: &TicketSpec) -> Vec<u8> {
    let mut spec = crate::ticket::TicketSpec::simple(
        t.chip,
        t.board,
        t.ecid,
        t.security_domain,
        t.digests.clone(),
    );
    spec.production = t.production;
    spec.security = t.security;
    for c in &mut spec.components {
        c.epro = t.production;
        c.esec = t.security;
    }
    crate::ticket::sign_im4m(&spec)
}

/// `IM4R` with the given properties.
pub fn build_im4r(props: &[(FourCc, PropValue)]) -> Vec<u8> {
    let mut c = encode(Tag::IA5_STRING, b"IM4R");
    c.extend(encode_set(props));
    encode(Tag::SEQUENCE, &c)
}

/// `SEQUENCE { "IMG4", IM4P, [0] IM4M, [1] IM4R? }` (§5.3).
pub fn stitch(im4p: &[u8], im4m: &[u8], im4r: Option<&[u8]>) -> Vec<u8> {
    let mut c = encode(Tag::IA5_STRING, b"IMG4");
    c.extend_from_slice(im4p);
    c.extend(encode(Tag::context(0), im4m));
    if let Some(r) = im4r {
        c.extend(encode(Tag::context(1), r));
    }
    encode(Tag::SEQUENCE, &c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let p = crate::board::shared_dir().join("fixtures/tss").join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    /// The 22-byte local-policy IM4P of §5.5.
    const LPOL: [u8; 22] = [
        0x30, 0x14, 0x16, 0x04, 0x49, 0x4D, 0x34, 0x50, 0x16, 0x04, 0x6C, 0x70, 0x6F, 0x6C, 0x16,
        0x03, 0x31, 0x2E, 0x30, 0x04, 0x01, 0x00,
    ];

    #[test]
    fn private_tag_encoding_matches_apple() {
        // From PyIMG4-IM4R.der: ff 84 92 b9 86 4e = [PRIVATE 'BNCN'].
        let mut out = Vec::new();
        push_tag(&mut out, Tag::private(FourCc(*b"BNCN")));
        assert_eq!(out, [0xFF, 0x84, 0x92, 0xB9, 0x86, 0x4E]);
    }

    #[test]
    fn lengths_are_minimal_and_read_back() {
        for (len, head) in [
            (0usize, vec![0x00]),
            (0x7F, vec![0x7F]),
            (0x80, vec![0x81, 0x80]),
            (0x100, vec![0x82, 0x01, 0x00]),
            (0x1_0000, vec![0x83, 0x01, 0x00, 0x00]),
            (0x0100_0000, vec![0x84, 0x01, 0x00, 0x00, 0x00]),
        ] {
            let mut out = Vec::new();
            push_len(&mut out, len);
            assert_eq!(out, head, "{len:#x}");
        }
        let big = vec![0xAB; 0x0100_0001];
        let enc = encode(Tag::OCTET_STRING, &big);
        assert_eq!(&enc[..6], &[0x04, 0x84, 0x01, 0x00, 0x00, 0x01]);
        let t = read_single(&enc).unwrap();
        assert_eq!(t.content.len(), big.len());
    }

    #[test]
    fn reads_the_lpol_im4p() {
        let p = Im4p::parse(&LPOL).unwrap();
        assert_eq!(p.fourcc, FourCc(*b"lpol"));
        assert_eq!(p.description, "1.0");
        assert_eq!(p.payload, &[0]);
        assert_eq!(build_im4p(FourCc(*b"lpol"), "1.0", &[0]), LPOL);
    }

    #[test]
    fn reads_pyimg4_im4m() {
        let data = fixture("PyIMG4-IM4M.der");
        let m = Im4m::parse(&data).unwrap();
        assert_eq!(m.version, 0);
        assert_eq!(m.manp_uint("CHIP"), Some(0x8015));
        assert_eq!(m.manp_uint("BORD"), Some(0x0E));
        assert_eq!(m.manp_uint("ECID"), Some(0x1234_5678_9012));
        assert_eq!(m.manp_uint("SDOM"), Some(1));
        assert_eq!(m.manp_uint("CEPO"), Some(1));
        let manp = m.manp().unwrap();
        assert_eq!(find(manp, "CPRO").unwrap().value, Value::Boolean(true));
        assert_eq!(find(manp, "CSEC").unwrap().value, Value::Boolean(true));
        assert_eq!(m.manp_data("BNCH").unwrap().len(), 32);
        assert!(m.manp_data("SIMS").is_none());
        // MANP + 35 component objects (see openssl asn1parse of the fixture).
        assert_eq!(m.manifest.len(), 36);
        assert_eq!(m.manifest[1].fourcc, FourCc(*b"acfw"));
        let dgst = m.digest_of(FourCc(*b"acfw")).unwrap();
        assert_eq!(&dgst[..4], &[0x6F, 0x7D, 0x71, 0xB6]);
        let aopf = m.object(FourCc(*b"aopf")).unwrap();
        assert_eq!(find(aopf, "EKEY").unwrap().value, Value::Boolean(false));
        assert_eq!(m.signature.unwrap().len(), 512);
        assert_eq!(m.certificates.unwrap().len(), 1714);
        assert_eq!(m.signed_set.len(), 5147);
    }

    #[test]
    fn reads_pyimg4_img4() {
        let data = fixture("PyIMG4-IMG4-test.der");
        let i = Img4::parse(&data).unwrap();
        assert_eq!(i.im4p.fourcc, FourCc(*b"test"));
        assert_eq!(i.im4p.description, "Test Image4 payload.");
        assert_eq!(i.im4p.payload.len(), 49424);
        assert_eq!(&i.im4p.payload[..4], &[0xCF, 0xFA, 0xED, 0xFE]);
        assert_eq!(i.im4p.raw.len(), 49466);
        let m = i.im4m.unwrap();
        assert_eq!(m.manp_uint("CHIP"), Some(0x8015));
        assert_eq!(m.raw, fixture("PyIMG4-IM4M.der").as_slice());
        assert!(i.im4r.is_none());
    }

    #[test]
    fn reads_pyimg4_im4r() {
        let data = fixture("PyIMG4-IM4R.der");
        let r = Im4r::parse(&data).unwrap();
        assert_eq!(r.properties.len(), 1);
        assert_eq!(r.properties[0].fourcc, FourCc(*b"BNCN"));
        assert_eq!(
            r.properties[0].value,
            Value::Data(&[0x7C, 0xD2, 0xC2, 0xE8, 0xAE, 0xBB, 0x56, 0x5F])
        );
        // Our writer produces the identical bytes.
        let again = build_im4r(&[(
            FourCc(*b"BNCN"),
            PropValue::Data(vec![0x7C, 0xD2, 0xC2, 0xE8, 0xAE, 0xBB, 0x56, 0x5F]),
        )]);
        assert_eq!(again, data);
    }

    fn sample_ticket() -> crate::ticket::TicketSpec {
        crate::ticket::TicketSpec::simple(
            0x8103,
            0x22,
            0x0011_2233_4455_6677,
            1,
            vec![
                (FourCc(*b"rkrn"), vec![1; 48]),
                (FourCc(*b"ibss"), vec![2; 48]),
            ],
        )
    }

    /// A ticket with a fixed fake signature, so its bytes are reproducible.
    fn build_sample_im4m() -> Vec<u8> {
        let t = sample_ticket();
        let manb = vec![
            (
                FourCc(*b"MANP"),
                PropValue::Set(vec![
                    (FourCc(*b"BORD"), PropValue::Integer(u64::from(t.board))),
                    (FourCc(*b"CHIP"), PropValue::Integer(u64::from(t.chip))),
                    (FourCc(*b"ECID"), PropValue::Integer(t.ecid)),
                    (FourCc(*b"SDOM"), PropValue::Integer(1)),
                ]),
            ),
            (
                FourCc(*b"rkrn"),
                PropValue::Set(vec![(FourCc(*b"DGST"), PropValue::Data(vec![1; 48]))]),
            ),
            (
                FourCc(*b"ibss"),
                PropValue::Set(vec![(FourCc(*b"DGST"), PropValue::Data(vec![2; 48]))]),
            ),
        ];
        build_im4m_with(
            manb,
            |set| Sha384::digest(set).to_vec(),
            &encode(Tag::SEQUENCE, &encode(Tag::IA5_STRING, b"certs")),
        )
    }

    #[test]
    fn writer_round_trips() {
        let im4p = build_im4p(FourCc(*b"ibss"), "iBoot-1.0", &[9u8; 300]);
        let im4m = build_sample_im4m();
        let im4r = build_im4r(&[(FourCc(*b"BNCN"), PropValue::Data(vec![1, 2, 3]))]);
        let img4 = stitch(&im4p, &im4m, Some(&im4r));
        let i = Img4::parse(&img4).unwrap();
        assert_eq!(i.im4p.raw, im4p.as_slice());
        assert_eq!(i.im4p.payload, &[9u8; 300]);
        let m = i.im4m.unwrap();
        assert_eq!(m.raw, im4m.as_slice());
        assert_eq!(m.manp_uint("CHIP"), Some(0x8103));
        assert_eq!(m.manp_uint("BORD"), Some(0x22));
        assert_eq!(m.manp_uint("ECID"), Some(0x0011_2233_4455_6677));
        assert_eq!(m.manp_uint("SDOM"), Some(1));
        assert_eq!(m.digest_of(FourCc(*b"rkrn")), Some(&[1u8; 48][..]));
        assert_eq!(m.digest_of(FourCc(*b"ibss")), Some(&[2u8; 48][..]));
        assert_eq!(m.digest_of(FourCc(*b"rdsk")), None);
        // Sorted SET: MANP, then ibss before rkrn.
        let order: Vec<_> = m.manifest.iter().map(|p| p.fourcc.to_string()).collect();
        assert_eq!(order, ["MANP", "ibss", "rkrn"]);
        assert_eq!(
            m.signature,
            Some(&Sha384::digest(m.signed_set)[..]),
            "the signer saw exactly the signed set"
        );
        assert_eq!(
            m.certificates,
            Some(&encode(Tag::SEQUENCE, &encode(Tag::IA5_STRING, b"certs"))[..])
        );
        // The real signer: its signature verifies over the signed set.
        let signed = build_im4m(&TicketSpec {
            chip: 0x8103,
            board: 0x22,
            ecid: 7,
            security_domain: 1,
            production: false,
            security: true,
            digests: vec![(FourCc(*b"ibss"), vec![2; 48])],
        });
        let sm = Im4m::parse(&signed).unwrap();
        assert!(crate::ticket::verify_signature(
            sm.signed_set,
            sm.signature.unwrap()
        ));
        assert_eq!(sm.manp_uint("ECID"), Some(7));
        let epro = find(sm.object(FourCc(*b"ibss")).unwrap(), "EPRO").unwrap();
        assert_eq!(epro.value, Value::Boolean(false));
        assert_eq!(
            find(sm.manp().unwrap(), "CPRO").unwrap().value,
            Value::Boolean(false)
        );
        assert_eq!(i.im4r.unwrap().properties[0].fourcc, FourCc(*b"BNCN"));
        // Without IM4R.
        let plain = stitch(&im4p, &im4m, None);
        assert!(Img4::parse(&plain).unwrap().im4r.is_none());
    }

    #[test]
    fn integers_encode_minimally() {
        assert_eq!(encode_uint(0), [2, 1, 0]);
        assert_eq!(encode_uint(0x80), [2, 2, 0, 0x80]);
        assert_eq!(encode_uint(0x8103), [2, 3, 0, 0x81, 0x03]);
        assert_eq!(read_uint(&[0, 0x81, 0x03]), Some(0x8103));
        assert_eq!(read_uint(&[0xFF]), None, "negative");
        assert_eq!(read_uint(&[1; 9]), None, "too big");
        assert_eq!(encode_uint(u64::MAX).len(), 11);
        assert_eq!(read_uint(&encode_uint(u64::MAX)[2..]), Some(u64::MAX));
    }

    #[test]
    fn rejects_wrong_structures() {
        let im4p = build_im4p(FourCc(*b"ibss"), "x", b"abc");
        // An IM4P is not an IMG4.
        assert!(matches!(
            Img4::parse(&im4p),
            Err(Img4Error::Unexpected { .. })
        ));
        // Trailing garbage.
        let mut t = LPOL.to_vec();
        t.push(0);
        assert!(Im4p::parse(&t).is_err());
        // Indefinite length.
        assert!(read_single(&[0x30, 0x80, 0, 0]).is_err());
        // 5-byte long form.
        assert!(read_single(&[0x04, 0x85, 0, 0, 0, 0, 1, 0]).is_err());
        // A 3-character type.
        let bad = encode(
            Tag::SEQUENCE,
            &[
                encode(Tag::IA5_STRING, b"IM4P"),
                encode(Tag::IA5_STRING, b"abc"),
                encode(Tag::IA5_STRING, b""),
                encode(Tag::OCTET_STRING, b""),
            ]
            .concat(),
        );
        assert!(Im4p::parse(&bad).is_err());
        // Property tag and name disagree.
        let mut seq = encode(Tag::IA5_STRING, b"CHIP");
        seq.extend(encode_uint(1));
        let prop = encode(Tag::private(FourCc(*b"BORD")), &encode(Tag::SEQUENCE, &seq));
        assert!(parse_properties(&prop, 1).is_err());
    }

    /// A tiny deterministic generator so the fuzz-style tests need no dependency.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn truncations_error_instead_of_panicking() {
        let im4p = build_im4p(FourCc(*b"ibec"), "x", &[7u8; 600]);
        let im4m = build_sample_im4m();
        let img4 = stitch(&im4p, &im4m, None);
        for n in 0..img4.len() {
            assert!(Img4::parse(&img4[..n]).is_err(), "prefix {n}");
        }
        let real = fixture("PyIMG4-IM4M.der");
        for n in (0..real.len()).step_by(7) {
            assert!(Im4m::parse(&real[..n]).is_err(), "prefix {n}");
        }
    }

    #[test]
    fn random_and_mutated_input_never_panics() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let base = stitch(
            &build_im4p(FourCc(*b"rkrn"), "k", &[3u8; 200]),
            &build_sample_im4m(),
            Some(&build_im4r(&[(FourCc(*b"BNCN"), PropValue::Data(vec![1]))])),
        );
        for _ in 0..3000 {
            let mut m = base.clone();
            for _ in 0..1 + rng.next() % 4 {
                let i = (rng.next() as usize) % m.len();
                m[i] = rng.next() as u8;
            }
            let _ = Img4::parse(&m);
            let _ = Im4m::parse(&m[10..]);
            let len = (rng.next() % 64) as usize;
            let junk: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let _ = Img4::parse(&junk);
            let _ = Im4p::parse(&junk);
            let _ = Im4m::parse(&junk);
            let _ = Im4r::parse(&junk);
        }
        // Deep nesting of SETs inside properties is bounded, not recursed without end.
        let mut v = PropValue::Integer(1);
        for _ in 0..200 {
            v = PropValue::Set(vec![(FourCc(*b"DEEP"), v)]);
        }
        let enc = encode_property(FourCc(*b"DEEP"), &v);
        assert!(parse_properties(&enc, 1).is_ok());
    }
}
