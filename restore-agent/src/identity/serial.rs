//! The SecureROM / iBoot USB serial string (protocol.md §1.3) and the nonce string (§1.4).
//!
//! The string is a list of `TAG:value` tokens (`CPID:8103 CPRV:11 … SRTG:[iBoot-…]`). Like
//! libirecovery we look each tag up wherever it occurs rather than insisting on an order, and we
//! are lenient: a missing or garbled token yields `None` for that field and never an error, so a
//! half-readable string still identifies what it can.
//!
//! Two deliberate widenings over libirecovery, both for strings seen in the wild:
//! * tags match ASCII case-insensitively and any non-alphanumeric character separates tokens,
//!   so the Windows device-instance form `sdom:01_cpid:8132_…_srnm:[l3412n76qj]` parses too;
//! * a tag only matches at a token start, so `XCPID:` never reads as `CPID:`.

/// Every field the serial string (or the nonce string) can carry. Values are as printed; the
/// Port DFU repacking of BDID (§1.5) happens in [`crate::identity`], which knows the mode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SerialFields {
    pub cpid: Option<u32>,
    pub cprv: Option<u32>,
    pub cpfm: Option<u32>,
    pub scep: Option<u32>,
    /// 64-bit hex in the string (Port DFU packs more into it), truncated to 32 bits as
    /// libirecovery does.
    pub bdid: Option<u32>,
    pub ecid: Option<u64>,
    pub ibfl: Option<u32>,
    pub prev: Option<u32>,
    pub sdom: Option<u32>,
    pub srtg: Option<String>,
    pub srnm: Option<String>,
    pub imei: Option<String>,
    pub pwnd: Option<String>,
    pub nonc: Option<Vec<u8>>,
    pub snon: Option<Vec<u8>>,
}

/// Parse a serial (or nonce) string. Never fails: absent or unreadable tokens are `None`.
pub fn parse(s: &str) -> SerialFields {
    SerialFields {
        cpid: hex32(s, "CPID"),
        cprv: hex32(s, "CPRV"),
        cpfm: hex32(s, "CPFM"),
        scep: hex32(s, "SCEP"),
        // Truncation (not rejection) of wide values is libirecovery's behaviour.
        bdid: hex64(s, "BDID").map(|v| v as u32),
        ecid: hex64(s, "ECID"),
        ibfl: hex32(s, "IBFL"),
        prev: hex32(s, "PREV"),
        sdom: hex32(s, "SDOM"),
        srtg: bracketed(s, "SRTG"),
        srnm: bracketed(s, "SRNM"),
        imei: bracketed(s, "IMEI"),
        pwnd: bracketed(s, "PWND"),
        nonc: hex_bytes(s, "NONC"),
        snon: hex_bytes(s, "SNON"),
    }
}

/// The text right after the first `TAG:` that starts a token, if any.
fn value_after<'a>(s: &'a str, tag: &str) -> Option<&'a str> {
    let bytes = s.as_bytes();
    let tag = tag.as_bytes();
    let n = tag.len();
    // Byte-wise scan: the tags are ASCII, so a match never splits a UTF-8 sequence and the
    // slice after it starts on a character boundary.
    (0..bytes.len()).find_map(|i| {
        let candidate = bytes.get(i..i + n + 1)?;
        let at_token_start = i == 0 || !bytes[i - 1].is_ascii_alphanumeric();
        if at_token_start && candidate[..n].eq_ignore_ascii_case(tag) && candidate[n] == b':' {
            s.get(i + n + 1..)
        } else {
            None
        }
    })
}

/// The run of hex digits starting the value, when it is properly terminated (end of string or
/// a separator). `81G3` is garbled, not `0x81`.
fn hex_run<'a>(s: &'a str, tag: &str) -> Option<&'a str> {
    let v = value_after(s, tag)?;
    let end = v
        .bytes()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(v.len());
    let terminated = !matches!(v.as_bytes().get(end), Some(b) if b.is_ascii_alphanumeric());
    if end == 0 || !terminated {
        return None;
    }
    Some(&v[..end])
}

fn hex64(s: &str, tag: &str) -> Option<u64> {
    let digits = hex_run(s, tag)?;
    // Leading zeros are common (ECID:0005681C…) and must not count against the width.
    let significant = digits.trim_start_matches('0');
    if significant.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(significant, 16).ok()
}

fn hex32(s: &str, tag: &str) -> Option<u32> {
    hex64(s, tag).and_then(|v| u32::try_from(v).ok())
}

fn bracketed(s: &str, tag: &str) -> Option<String> {
    let v = value_after(s, tag)?.strip_prefix('[')?;
    let end = v.find(']')?;
    Some(v[..end].to_string())
}

/// Nonces are hex byte strings; an odd digit count means a cut-off token, not a nibble.
fn hex_bytes(s: &str, tag: &str) -> Option<Vec<u8>> {
    let digits = hex_run(s, tag)?;
    hex::decode(digits).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iphone6_dfu_string_from_system_information() {
        // libimobiledevice#146, verbatim.
        let f = parse(
            "CPID:7000 CPRV:11 CPFM:03 SCEP:01 BDID:00 ECID:00022D3C10981026 IBFL:1C SRTG:[iBoot-1992.0.0.1.19]",
        );
        assert_eq!(f.cpid, Some(0x7000));
        assert_eq!(f.cprv, Some(0x11));
        assert_eq!(f.cpfm, Some(0x03));
        assert_eq!(f.scep, Some(0x01));
        assert_eq!(f.bdid, Some(0x00));
        assert_eq!(f.ecid, Some(0x0002_2D3C_1098_1026));
        assert_eq!(f.ibfl, Some(0x1c));
        assert_eq!(f.srtg.as_deref(), Some("iBoot-1992.0.0.1.19"));
        assert_eq!(f.srnm, None);
        assert_eq!(f.nonc, None);
        assert_eq!(f.sdom, None);
    }

    #[test]
    fn windows_instance_path_form() {
        // idevicerestore#670: lower-cased, '_' separated, embedded in a device path.
        let f = parse(
            r"\\?\usb#vid_05ac&pid_1281#sdom:01_cpid:8132_cprv:11_cpfm:03_scep:01_bdid:0a_ecid:000239da3ab9001c_ibfl:3d_sika:00_srnm:[l3412n76qj]#mux1",
        );
        assert_eq!(f.sdom, Some(1));
        assert_eq!(f.cpid, Some(0x8132));
        assert_eq!(f.bdid, Some(0x0a));
        assert_eq!(f.ecid, Some(0x0002_39da_3ab9_001c));
        assert_eq!(f.ecid, Some(626_559_404_277_788)); // "ECID: 626559404277788" in the log
        assert_eq!(f.ibfl, Some(0x3d));
        assert_eq!(f.srnm.as_deref(), Some("l3412n76qj"));
        assert_eq!(f.srtg, None);
    }

    #[test]
    fn nonces_decode_as_bytes() {
        let f = parse("NONC:00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF SNON:0102030405060708090a0b0c0d0e0f1011121314");
        let n = f.nonc.unwrap();
        assert_eq!(n.len(), 32);
        assert_eq!(&n[..4], &[0x00, 0x11, 0x22, 0x33]);
        assert_eq!(n[31], 0xff);
        assert_eq!(f.snon.unwrap(), (1..=20).collect::<Vec<u8>>());
    }

    #[test]
    fn garbled_tokens_are_none() {
        let f = parse("CPID:81G3 CPRV: CPFM:zz ECID:00112233445566778899 NONC:abc SNON: SRTG:[unterminated BDID:");
        assert_eq!(f, SerialFields::default());
        // Over-wide 32-bit field.
        assert_eq!(parse("CPID:100000000").cpid, None);
        // BDID is 64-bit and truncated.
        assert_eq!(parse("BDID:1234567890AB").bdid, Some(0x5678_90ab));
    }

    #[test]
    fn tags_only_at_token_start() {
        let f = parse("XCPID:1234 CPID:8103 SRTG:[a] XSRNM:[b]");
        assert_eq!(f.cpid, Some(0x8103));
        assert_eq!(f.srnm, None);
        assert_eq!(f.srtg.as_deref(), Some("a"));
    }

    #[test]
    fn messy_real_ecids() {
        // fixtures/usb: ECIDs of real Macs, as idevicerestore printed them (hex vs decimal).
        assert_eq!(
            parse("ECID:0005681c34d3001e").ecid,
            Some(1_521_845_238_169_630)
        );
        assert_eq!(
            parse("ECID:001c19983a28a01e").ecid,
            Some(7_909_440_949_362_718)
        );
        assert_eq!(
            parse("ECID:001C30603EC0C01E").ecid,
            Some(7_934_489_275_711_518)
        );
        // Log #729: only 13 digits.
        assert_eq!(parse("ECID:000e25ec3001e").ecid, Some(0xe25ec3001e));
        // More than 16 significant digits cannot be an ECID.
        assert_eq!(parse("ECID:10000000000000000").ecid, None);
        // 16+ digits with leading zeros still fit.
        assert_eq!(parse("ECID:00000000000000000001").ecid, Some(1));
    }

    #[test]
    fn non_ascii_input_does_not_panic() {
        let f = parse("ÄCPID:8103 ü CPID:1 NONC:é SRTG:[ö]");
        assert_eq!(f.cpid, Some(0x8103));
        assert_eq!(f.srtg.as_deref(), Some("ö"));
        assert_eq!(f.nonc, None);
        assert_eq!(parse(""), SerialFields::default());
        assert_eq!(parse("CPID"), SerialFields::default());
    }
}
