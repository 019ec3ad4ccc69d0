//! IMG4 personalization (§5 of the protocol notes): reading IM4P payloads and IM4M tickets,
//! and stitching them (plus an optional IM4R) into the IMG4 containers iBoot and restored
//! accept. Pure byte-in/byte-out code: no I/O, no panics on malformed input.

pub mod der;
pub mod fourcc;
pub mod im4m;
pub mod im4p;
pub mod im4r;

use std::ops::Range;

use sha2::{Digest, Sha384};

use der::Tag;
pub use im4m::Im4m;
pub use im4p::Im4p;
pub use im4r::{Im4rInputs, TbmData};

/// Everything that can be wrong with IMG4 data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Img4Error {
    #[error("malformed DER: {0}")]
    Der(#[from] der::DerError),
    #[error("the firmware file is not an IM4P payload ({0}); the IPSW may be damaged: download it again")]
    NotIm4p(&'static str),
    #[error("the ticket is not an IM4M ({0}); request a new ticket from Apple")]
    NotIm4m(&'static str),
    #[error("the data is not an IMG4 container ({0})")]
    NotImg4(&'static str),
    #[error("the IM4R block is malformed ({0})")]
    BadIm4r(&'static str),
}

/// The local policy iBoot is told to install with `lpolrestore`: an IM4P of type `lpol`
/// with a single zero byte, i.e. the default ("empty") policy (§5.5).
pub const LPOL_IM4P: [u8; 22] = [
    0x30, 0x14, 0x16, 0x04, 0x49, 0x4D, 0x34, 0x50, 0x16, 0x04, 0x6C, 0x70, 0x6F, 0x6C, 0x16, 0x03,
    0x31, 0x2E, 0x30, 0x04, 0x01, 0x00,
];

/// SHA-384 of [`LPOL_IM4P`]: the `Digest` of the `Ap,LocalPolicy` TSS entry.
pub fn lpol_digest() -> [u8; 48] {
    sha384(&LPOL_IM4P)
}

/// SHA-384, the digest tickets and local-policy requests use.
pub fn sha384(data: &[u8]) -> [u8; 48] {
    Sha384::digest(data).into()
}

/// Personalize a payload: `SEQUENCE { "IMG4", IM4P (restore 4CC applied), [0] ticket,
/// [1] IM4R? }` (§5.3). `im4r` is the `SEQUENCE { "IM4R", … }` from [`im4r::build`].
///
/// The IM4P is copied once into the output; nothing else is buffered, so this is fine for a
/// 100 MB+ ramdisk. Trailing bytes after the IM4P element are not carried over.
pub fn stitch(
    component: &str,
    im4p: &[u8],
    ticket: &[u8],
    im4r: Option<&[u8]>,
) -> Result<Vec<u8>, Img4Error> {
    let payload = im4p::parse(im4p)?;
    im4m::parse(ticket)?;
    let ticket_el = der::read(ticket)?;
    let ticket = ticket_el.raw;
    // Like the ticket, only the IM4R element itself is carried: bytes after it would end up
    // inside the `[1]` wrapper, where iBoot (and `parse_img4`) would find garbage.
    let im4r = match im4r {
        Some(r) => {
            let el = der::read(r)?;
            if el.tag != Tag::SEQUENCE
                || !el
                    .content
                    .starts_with(&[0x16, 0x04, b'I', b'M', b'4', b'R'])
            {
                return Err(Img4Error::BadIm4r("it does not start with \"IM4R\""));
            }
            Some(el.raw)
        }
        None => None,
    };
    let im4p_bytes = &im4p[payload.element.clone()];
    let magic = der::element(Tag::IA5_STRING, b"IMG4");
    let ticket_wrapped_len = der::header_len(Tag::context(0), ticket.len()) + ticket.len();
    let im4r_wrapped_len = im4r.map_or(0, |r| der::header_len(Tag::context(1), r.len()) + r.len());
    let content_len = magic.len() + im4p_bytes.len() + ticket_wrapped_len + im4r_wrapped_len;

    let mut out = Vec::with_capacity(content_len + 8);
    Tag::SEQUENCE.encode(&mut out);
    der::encode_len(content_len, &mut out);
    out.extend_from_slice(&magic);
    let patch_at = out.len() + (payload.fourcc_offset - payload.element.start);
    out.extend_from_slice(im4p_bytes);
    if let Some(tag) = fourcc::restore_rewrite(component) {
        // `patch_at` lies inside the IM4P copied just above (offset proven by `parse`).
        out[patch_at..patch_at + 4].copy_from_slice(&tag);
    }
    der::write(Tag::context(0), ticket, &mut out);
    if let Some(r) = im4r {
        der::write(Tag::context(1), r, &mut out);
    }
    Ok(out)
}

/// Where the parts of an IMG4 container lie (absolute offsets into the parsed buffer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Img4Parts {
    pub im4p: Range<usize>,
    /// The IM4M itself (without the `[0]` wrapper).
    pub im4m: Option<Range<usize>>,
    /// The IM4R SEQUENCE itself (without the `[1]` wrapper).
    pub im4r: Option<Range<usize>>,
}

/// Split an IMG4 container into its parts, checking each is well-formed.
pub fn parse_img4(buf: &[u8]) -> Result<Img4Parts, Img4Error> {
    let outer = der::read(buf)?;
    if outer.tag != Tag::SEQUENCE {
        return Err(Img4Error::NotImg4("it does not start with a DER SEQUENCE"));
    }
    let mut kids = outer.children();
    let magic = kids
        .next()
        .ok_or(Img4Error::NotImg4("the IMG4 magic is missing"))??;
    if magic.tag != Tag::IA5_STRING || magic.content != b"IMG4" {
        return Err(Img4Error::NotImg4("its first string is not \"IMG4\""));
    }
    let p = kids
        .next()
        .ok_or(Img4Error::NotImg4("the IM4P is missing"))??;
    let im4p = im4p::parse_element(&p)?.element;
    let mut parts = Img4Parts {
        im4p,
        im4m: None,
        im4r: None,
    };
    for el in kids {
        let el = el?;
        let inner = der::read_at(buf, el.content_range.start)?;
        if inner.end() != el.end() {
            return Err(Img4Error::NotImg4("a wrapped element has trailing bytes"));
        }
        if el.tag == Tag::context(0) {
            im4m::parse_element(&inner)?;
            parts.im4m = Some(inner.start..inner.end());
        } else if el.tag == Tag::context(1) {
            if inner.tag != Tag::SEQUENCE
                || !inner
                    .content
                    .starts_with(&[0x16, 0x04, b'I', b'M', b'4', b'R'])
            {
                return Err(Img4Error::BadIm4r("it does not start with \"IM4R\""));
            }
            parts.im4r = Some(inner.start..inner.end());
        } else {
            return Err(Img4Error::NotImg4("it holds an unexpected element"));
        }
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lpol_is_the_documented_im4p() {
        let p = im4p::parse(&LPOL_IM4P).unwrap();
        assert_eq!(p.fourcc, *b"lpol");
        assert_eq!(p.description, "1.0");
        assert_eq!(&LPOL_IM4P[p.payload], &[0x00]);
        assert_eq!(
            hex::encode(lpol_digest()),
            hex::encode(Sha384::digest(LPOL_IM4P))
        );
        assert_eq!(im4p::build(*b"lpol", "1.0", &[0]), LPOL_IM4P);
    }

    /// Found by the `img4` fuzz target: an IM4R followed by stray bytes was stitched with
    /// them inside the `[1]` wrapper, giving a container `parse_img4` refuses.
    #[test]
    fn stitch_drops_bytes_after_the_im4r() {
        let im4r = im4r::build(
            "SEP",
            &Im4rInputs {
                tbm: Some(TbmData {
                    ucon: vec![1],
                    ucer: vec![2],
                }),
                ..Default::default()
            },
        )
        .unwrap();
        let ticket = der::constructed(
            Tag::SEQUENCE,
            &[
                &der::element(Tag::IA5_STRING, b"IM4M"),
                &der::element(Tag::INTEGER, &[0]),
                &der::element(
                    Tag::SET,
                    &der::property(
                        *b"MANB",
                        &der::element(
                            Tag::SET,
                            &der::property(
                                *b"MANP",
                                &der::element(
                                    Tag::SET,
                                    &der::property(*b"ECID", &der::element(Tag::INTEGER, &[5])),
                                ),
                            ),
                        ),
                    ),
                ),
            ],
        );
        let mut padded = im4r.clone();
        padded.extend_from_slice(&[0xAB, 0xCD]);
        let out = stitch("SEP", &LPOL_IM4P, &ticket, Some(&padded)).unwrap();
        assert_eq!(
            out,
            stitch("SEP", &LPOL_IM4P, &ticket, Some(&im4r)).unwrap()
        );
        let parts = parse_img4(&out).unwrap();
        assert_eq!(&out[parts.im4r.unwrap()], &im4r[..]);
    }
}
