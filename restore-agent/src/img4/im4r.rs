//! IM4R restore-property blocks (§5.4).

use super::der::{self, Tag};

/// The `<Component>-TBM` data a TSS response may carry for SEP-related components.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TbmData {
    pub ucon: Vec<u8>,
    pub ucer: Vec<u8>,
}

/// What decides whether (and which) IM4R a component gets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Im4rInputs {
    /// `<Component>-TBM` from the TSS response, if any.
    pub tbm: Option<TbmData>,
    /// Only learned when the device was in normal mode; DFU-started Mac restores leave it false.
    pub requires_nonce_slot: bool,
    pub ap_nonce_slot_id: Option<u64>,
    pub sep_nonce_slot_id: Option<u64>,
}

/// Build the IM4R `SEQUENCE { "IM4R", SET { … } }` for `component`, or `None` when the
/// component needs none. The caller wraps it in `[1]` when stitching.
pub fn build(component: &str, inputs: &Im4rInputs) -> Option<Vec<u8>> {
    let mut props: Vec<Vec<u8>> = Vec::new();
    if inputs.requires_nonce_slot {
        let slot = match component {
            "SEP" | "SepStage1" => Some((*b"snid", inputs.sep_nonce_slot_id.unwrap_or(2))),
            "LLB" => Some((*b"anid", inputs.ap_nonce_slot_id.unwrap_or(0))),
            _ => None,
        };
        if let Some((tag, value)) = slot {
            let int = der::element(Tag::INTEGER, &der::encode_uint(value));
            props.push(der::property(tag, &int));
        }
    }
    if let Some(tbm) = &inputs.tbm {
        props.push(der::property(
            *b"ucon",
            &der::element(Tag::OCTET_STRING, &tbm.ucon),
        ));
        props.push(der::property(
            *b"ucer",
            &der::element(Tag::OCTET_STRING, &tbm.ucer),
        ));
    }
    if props.is_empty() {
        return None;
    }
    let set = der::element(Tag::SET, &props.concat());
    Some(der::constructed(
        Tag::SEQUENCE,
        &[&der::element(Tag::IA5_STRING, b"IM4R"), &set],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_im4r_without_reason() {
        assert_eq!(build("iBSS", &Im4rInputs::default()), None);
        let slot_only = Im4rInputs {
            requires_nonce_slot: true,
            ..Default::default()
        };
        assert_eq!(build("iBEC", &slot_only), None);
    }

    #[test]
    fn sep_nonce_slot_exact_bytes() {
        let inputs = Im4rInputs {
            requires_nonce_slot: true,
            ..Default::default()
        };
        let got = build("SEP", &inputs).unwrap();
        let want = [
            0x30, 0x1A, 0x16, 0x04, b'I', b'M', b'4', b'R', 0x31, 0x12, // header + SET
            0xFF, 0x87, 0x9B, 0xB9, 0xD2, 0x64, 0x0B, // [PRIVATE 'snid'], len 11
            0x30, 0x09, 0x16, 0x04, b's', b'n', b'i', b'd', 0x02, 0x01, 0x02,
        ];
        assert_eq!(got, want);
        let llb = build("LLB", &inputs).unwrap();
        assert!(llb.windows(4).any(|w| w == b"anid"));
        assert!(llb.ends_with(&[0x02, 0x01, 0x00]));
    }

    #[test]
    fn tbm_properties() {
        let inputs = Im4rInputs {
            tbm: Some(TbmData {
                ucon: vec![1, 2, 3],
                ucer: vec![4, 5],
            }),
            ..Default::default()
        };
        let got = build("RestoreSEP", &inputs).unwrap();
        let ucon = der::property(*b"ucon", &[0x04, 0x03, 1, 2, 3]);
        let ucer = der::property(*b"ucer", &[0x04, 0x02, 4, 5]);
        let set = der::element(Tag::SET, &[ucon, ucer].concat());
        let want = der::constructed(Tag::SEQUENCE, &[&[0x16, 4, b'I', b'M', b'4', b'R'], &set]);
        assert_eq!(got, want);
    }
}
