//! IM4P payload containers as shipped in the IPSW (§5.2).

use std::ops::Range;

use super::der::{self, Tag};
use super::{fourcc, Img4Error};

/// Where the interesting parts of an IM4P lie; ranges are absolute offsets into the buffer
/// that was parsed, so callers can patch or slice without copying a 100 MB ramdisk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Im4p {
    /// The payload type, e.g. `ibss`, `rkrn`.
    pub fourcc: [u8; 4],
    /// Offset of the 4 type bytes (the target of the restore 4CC rewrite).
    pub fourcc_offset: usize,
    /// The description/version string (e.g. `iBoot-13822.61.10`), lossily decoded.
    pub description: String,
    /// The payload octets (possibly compressed or encrypted; not interpreted here).
    pub payload: Range<usize>,
    /// The whole IM4P element (header included).
    pub element: Range<usize>,
}

/// Parse the IM4P element at the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<Im4p, Img4Error> {
    let outer = der::read(buf)?;
    parse_element(&outer)
}

pub(super) fn parse_element(outer: &der::Element<'_>) -> Result<Im4p, Img4Error> {
    if outer.tag != Tag::SEQUENCE {
        return Err(Img4Error::NotIm4p("it does not start with a DER SEQUENCE"));
    }
    let mut kids = outer.children();
    let mut next = |what: &'static str| -> Result<der::Element<'_>, Img4Error> {
        kids.next()
            .ok_or(Img4Error::NotIm4p(what))?
            .map_err(Img4Error::from)
    };
    let magic = next("the IM4P magic is missing")?;
    if magic.tag != Tag::IA5_STRING || magic.content != b"IM4P" {
        return Err(Img4Error::NotIm4p("its first string is not \"IM4P\""));
    }
    let kind = next("the type tag is missing")?;
    let fourcc = <[u8; 4]>::try_from(kind.content)
        .ok()
        .filter(|_| kind.tag == Tag::IA5_STRING)
        .ok_or(Img4Error::NotIm4p(
            "its type tag is not a 4-character string",
        ))?;
    let desc = next("the description is missing")?;
    if desc.tag != Tag::IA5_STRING {
        return Err(Img4Error::NotIm4p("its description is not a string"));
    }
    let payload = next("the payload is missing")?;
    if payload.tag != Tag::OCTET_STRING {
        return Err(Img4Error::NotIm4p("its payload is not an OCTET STRING"));
    }
    // Remaining elements (KBAG, compression info) are carried along untouched, but must at
    // least be well-formed so a corrupted tail is noticed before it reaches the Mac.
    for extra in kids {
        extra?;
    }
    Ok(Im4p {
        fourcc,
        fourcc_offset: kind.content_range.start,
        description: String::from_utf8_lossy(desc.content).into_owned(),
        payload: payload.content_range,
        element: outer.start..outer.end(),
    })
}

/// Apply the restore 4CC rewrite for `component` in place (§5.2). Returns the tag now carried
/// when a rewrite applies to this component, `None` when the component keeps its own tag.
pub fn rewrite_fourcc(component: &str, im4p: &mut [u8]) -> Result<Option<[u8; 4]>, Img4Error> {
    let parsed = parse(im4p)?;
    let Some(tag) = fourcc::restore_rewrite(component) else {
        return Ok(None);
    };
    // `parse` proved the 4 type bytes lie inside `im4p` at this offset.
    im4p[parsed.fourcc_offset..parsed.fourcc_offset + 4].copy_from_slice(&tag);
    Ok(Some(tag))
}

/// Build an IM4P (used for test payloads and for the embedded local policy).
pub fn build(fourcc: [u8; 4], description: &str, payload: &[u8]) -> Vec<u8> {
    der::constructed(
        Tag::SEQUENCE,
        &[
            &der::element(Tag::IA5_STRING, b"IM4P"),
            &der::element(Tag::IA5_STRING, &fourcc),
            &der::element(Tag::IA5_STRING, description.as_bytes()),
            &der::element(Tag::OCTET_STRING, payload),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_built_im4p() {
        let bytes = build(*b"krnl", "KernelCacheBuilder-1", b"payload!");
        let p = parse(&bytes).unwrap();
        assert_eq!(p.fourcc, *b"krnl");
        assert_eq!(p.description, "KernelCacheBuilder-1");
        assert_eq!(&bytes[p.payload.clone()], b"payload!");
        assert_eq!(p.element, 0..bytes.len());
        assert_eq!(&bytes[p.fourcc_offset..p.fourcc_offset + 4], b"krnl");
    }

    #[test]
    fn rewrite_only_listed_components() {
        let orig = build(*b"krnl", "x", b"data");
        let mut b = orig.clone();
        assert_eq!(rewrite_fourcc("KernelCache", &mut b).unwrap(), None);
        assert_eq!(b, orig);
        assert_eq!(
            rewrite_fourcc("RestoreKernelCache", &mut b).unwrap(),
            Some(*b"rkrn")
        );
        assert_eq!(parse(&b).unwrap().fourcc, *b"rkrn");
        // Only the 4 type bytes changed.
        let diff: Vec<usize> = (0..b.len()).filter(|&i| b[i] != orig[i]).collect();
        assert_eq!(diff.len(), 4);
    }

    #[test]
    fn rejects_non_im4p() {
        assert!(matches!(parse(b""), Err(Img4Error::Der(_))));
        let wrong_magic =
            der::constructed(Tag::SEQUENCE, &[&der::element(Tag::IA5_STRING, b"IM4M")]);
        assert!(matches!(parse(&wrong_magic), Err(Img4Error::NotIm4p(_))));
        let short_type = build(*b"abcd", "x", b"");
        let mut bad = short_type.clone();
        bad.truncate(bad.len() - 1);
        assert!(parse(&bad).is_err());
        let mut b = der::element(Tag::OCTET_STRING, b"IM4P");
        assert!(rewrite_fourcc("RestoreSEP", &mut b).is_err());
    }
}
