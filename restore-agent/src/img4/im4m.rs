//! IM4M tickets (`ApImg4Ticket`): read what a ticket covers (§5.6).
//!
//! Only the structure is read; the signature is not verified (that is the Mac's job). The
//! point is to tell a technician which Mac (ECID/CHIP/BORD) and which components a ticket is
//! for, and to check a ticket before it is stitched.

use std::fmt;

use super::der::{self, Class, Element, Tag};
use super::Img4Error;

/// A decoded property value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PropValue {
    Int(u64),
    Bool(bool),
    Data(Vec<u8>),
    Text(String),
    /// A value of another type (or an integer that does not fit): its raw DER element.
    Other(Vec<u8>),
}

/// The properties of one dictionary (`MANP` or a component), in ticket order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties(pub Vec<([u8; 4], PropValue)>);

impl Properties {
    pub fn get(&self, fourcc: &[u8; 4]) -> Option<&PropValue> {
        self.0.iter().find(|(k, _)| k == fourcc).map(|(_, v)| v)
    }

    pub fn int(&self, fourcc: &[u8; 4]) -> Option<u64> {
        match self.get(fourcc)? {
            PropValue::Int(v) => Some(*v),
            _ => None,
        }
    }

    pub fn bool(&self, fourcc: &[u8; 4]) -> Option<bool> {
        match self.get(fourcc)? {
            PropValue::Bool(v) => Some(*v),
            _ => None,
        }
    }

    pub fn data(&self, fourcc: &[u8; 4]) -> Option<&[u8]> {
        match self.get(fourcc)? {
            PropValue::Data(v) => Some(v),
            _ => None,
        }
    }

    /// `DGST`: the digest of the payload this entry authorizes.
    pub fn digest(&self) -> Option<&[u8]> {
        self.data(b"DGST")
    }
    /// `EPRO`: effective production mode.
    pub fn epro(&self) -> Option<bool> {
        self.bool(b"EPRO")
    }
    /// `ESEC`: effective security mode.
    pub fn esec(&self) -> Option<bool> {
        self.bool(b"ESEC")
    }
    /// `EKEY`: whether the payload may be decrypted with the device key.
    pub fn ekey(&self) -> Option<bool> {
        self.bool(b"EKEY")
    }
}

/// A parsed ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Im4m {
    pub version: u64,
    /// `MANP`: properties of the device/ticket as a whole.
    pub manifest: Properties,
    /// One entry per component 4CC the ticket covers, in ticket order.
    pub components: Vec<([u8; 4], Properties)>,
    /// Whether a signature follows the body (an Apple-issued ticket always has one).
    pub signed: bool,
}

impl Im4m {
    pub fn ecid(&self) -> Option<u64> {
        self.manifest.int(b"ECID")
    }
    pub fn chip_id(&self) -> Option<u64> {
        self.manifest.int(b"CHIP")
    }
    pub fn board_id(&self) -> Option<u64> {
        self.manifest.int(b"BORD")
    }
    pub fn security_domain(&self) -> Option<u64> {
        self.manifest.int(b"SDOM")
    }
    pub fn production_mode(&self) -> Option<bool> {
        self.manifest.bool(b"CPRO")
    }
    pub fn security_mode(&self) -> Option<bool> {
        self.manifest.bool(b"CSEC")
    }
    /// `BNCH`: hash of the ApNonce the ticket was issued for.
    pub fn ap_nonce_hash(&self) -> Option<&[u8]> {
        self.manifest.data(b"BNCH")
    }
    /// `snon`: hash of the SepNonce, when present.
    pub fn sep_nonce_hash(&self) -> Option<&[u8]> {
        self.manifest.data(b"snon")
    }
    /// The entry for a component 4CC (e.g. `ibss`).
    pub fn component(&self, fourcc: &[u8; 4]) -> Option<&Properties> {
        self.components
            .iter()
            .find(|(k, _)| k == fourcc)
            .map(|(_, v)| v)
    }
}

fn fourcc_text(tag: &[u8; 4]) -> String {
    tag.iter()
        .map(|&b| if b.is_ascii_graphic() { b as char } else { '.' })
        .collect()
}

fn short_hex(data: &[u8]) -> String {
    let head = hex::encode(&data[..data.len().min(8)]);
    if data.len() > 8 {
        format!("{head}…")
    } else {
        head
    }
}

fn opt_hex(v: Option<u64>) -> String {
    v.map_or_else(|| "?".to_string(), |n| format!("{n:#X}"))
}

/// A technician-readable account of what the ticket covers: which Mac, which modes, which
/// nonces and which components.
impl fmt::Display for Im4m {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "ticket for ECID {}, CHIP {}, BORD {}, SDOM {}, production {}, security {}",
            opt_hex(self.ecid()),
            opt_hex(self.chip_id()),
            opt_hex(self.board_id()),
            opt_hex(self.security_domain()),
            self.production_mode().map_or("?".into(), |b| b.to_string()),
            self.security_mode().map_or("?".into(), |b| b.to_string()),
        )?;
        if let Some(h) = self.ap_nonce_hash() {
            writeln!(f, "  ApNonce hash (BNCH) {}", short_hex(h))?;
        }
        if let Some(h) = self.sep_nonce_hash() {
            writeln!(f, "  SepNonce hash (snon) {}", short_hex(h))?;
        }
        writeln!(f, "  {} components:", self.components.len())?;
        for (tag, props) in &self.components {
            let name = super::fourcc::component_for_fourcc(*tag).unwrap_or("?");
            write!(f, "    {} ({name})", fourcc_text(tag))?;
            if let Some(d) = props.digest() {
                write!(f, " DGST {}", short_hex(d))?;
            }
            for (flag, value) in [
                ("EPRO", props.epro()),
                ("ESEC", props.esec()),
                ("EKEY", props.ekey()),
            ] {
                if let Some(v) = value {
                    write!(f, " {flag}={v}")?;
                }
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

fn bad(why: &'static str) -> Img4Error {
    Img4Error::NotIm4m(why)
}

fn next_child<'a>(
    it: &mut der::Children<'a>,
    what: &'static str,
) -> Result<Element<'a>, Img4Error> {
    it.next().ok_or(bad(what))?.map_err(Img4Error::from)
}

/// Parse the IM4M element at the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<Im4m, Img4Error> {
    let outer = der::read(buf)?;
    parse_element(&outer)
}

pub(super) fn parse_element(outer: &Element<'_>) -> Result<Im4m, Img4Error> {
    if outer.tag != Tag::SEQUENCE {
        return Err(bad("it does not start with a DER SEQUENCE"));
    }
    let mut kids = outer.children();
    let magic = next_child(&mut kids, "the IM4M magic is missing")?;
    if magic.tag != Tag::IA5_STRING || magic.content != b"IM4M" {
        return Err(bad("its first string is not \"IM4M\""));
    }
    let version = next_child(&mut kids, "the version is missing")?;
    let version = (version.tag == Tag::INTEGER)
        .then(|| der::decode_uint(version.content))
        .flatten()
        .ok_or(bad("its version is not a small INTEGER"))?;
    let body = next_child(&mut kids, "the manifest body is missing")?;
    if body.tag != Tag::SET {
        return Err(bad("its manifest body is not a SET"));
    }
    let mut manb = None;
    for el in body.children() {
        let el = el?;
        if el.tag == Tag::private_fourcc(*b"MANB") {
            manb = Some(el);
        }
    }
    let manb = manb.ok_or(bad("it has no MANB block"))?;
    let manb_set = named_set(&manb, *b"MANB")?;
    let mut manifest = None;
    let mut components = Vec::new();
    for el in manb_set.children() {
        let el = el?;
        if el.tag.class != Class::Private {
            return Err(bad("its MANB block holds a non-property element"));
        }
        let fourcc = el.tag.fourcc();
        let set = named_set(&el, fourcc)?;
        let props = properties(&set)?;
        if fourcc == *b"MANP" {
            manifest = Some(props);
        } else {
            components.push((fourcc, props));
        }
    }
    let signed = matches!(kids.next(), Some(Ok(ref sig)) if sig.tag == Tag::OCTET_STRING);
    Ok(Im4m {
        version,
        manifest: manifest.ok_or(bad("it has no MANP properties"))?,
        components,
        signed,
    })
}

/// `[PRIVATE name] { SEQUENCE { IA5String name, SET {…} } }` → the SET.
fn named_set<'a>(el: &Element<'a>, name: [u8; 4]) -> Result<Element<'a>, Img4Error> {
    let (tag_name, value) = property_parts(el)?;
    if tag_name != name || value.tag != Tag::SET {
        return Err(bad("a ticket block is not a named SET"));
    }
    Ok(value)
}

/// `[PRIVATE x] { SEQUENCE { IA5String x, value } }` → (x, value).
fn property_parts<'a>(el: &Element<'a>) -> Result<([u8; 4], Element<'a>), Img4Error> {
    let mut outer = el.children();
    let seq = next_child(&mut outer, "a ticket property is empty")?;
    if seq.tag != Tag::SEQUENCE {
        return Err(bad("a ticket property is not a SEQUENCE"));
    }
    let mut inner = seq.children();
    let name = next_child(&mut inner, "a ticket property has no name")?;
    let name = <[u8; 4]>::try_from(name.content)
        .ok()
        .filter(|_| name.tag == Tag::IA5_STRING)
        .ok_or(bad("a ticket property name is not a 4CC"))?;
    if name != el.tag.fourcc() {
        return Err(bad("a ticket property's name does not match its tag"));
    }
    let value = next_child(&mut inner, "a ticket property has no value")?;
    Ok((name, value))
}

fn properties(set: &Element<'_>) -> Result<Properties, Img4Error> {
    let mut out = Vec::new();
    for el in set.children() {
        let el = el?;
        if el.tag.class != Class::Private {
            return Err(bad("a ticket dictionary holds a non-property element"));
        }
        let (name, value) = property_parts(&el)?;
        let decoded = match value.tag {
            Tag::INTEGER => der::decode_uint(value.content)
                .map(PropValue::Int)
                .unwrap_or_else(|| PropValue::Other(value.raw.to_vec())),
            Tag::BOOLEAN => match value.content {
                [b] => PropValue::Bool(*b != 0),
                _ => return Err(bad("a ticket BOOLEAN is not one byte")),
            },
            Tag::OCTET_STRING => PropValue::Data(value.content.to_vec()),
            Tag::IA5_STRING => PropValue::Text(String::from_utf8_lossy(value.content).into_owned()),
            _ => PropValue::Other(value.raw.to_vec()),
        };
        out.push((name, decoded));
    }
    Ok(Properties(out))
}
