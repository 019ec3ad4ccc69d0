//! The fuzzing entry points, shared by the cargo-fuzz targets (`fuzz_targets/*.rs`) and by the
//! stable-toolchain smoke test (`restore-agent/tests/fuzz_smoke.rs`, which includes this file),
//! so both exercise exactly the same code and invariants.
//!
//! Each function takes arbitrary bytes, must never panic on its own, and asserts the parsers'
//! invariants: what parses re-emits, and re-parses to the same value.

use restore_agent::identity::{serial, AppleMode, DeviceIdentity};
use restore_agent::usb::descriptor::{
    emit_language_ids, emit_string, parse_language_ids, parse_string, ConfigDescriptor,
    DescriptorError, DeviceDescriptor,
};

/// Serial-string parsing and identity building. The input is split at the first NUL into the
/// serial string and the nonce string; the first byte also picks the mode.
pub fn serial_string(data: &[u8]) {
    let (serial_bytes, nonce_bytes) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let serial = String::from_utf8_lossy(serial_bytes);
    let nonce = nonce_bytes.map(String::from_utf8_lossy);
    let mode = match data.first().map(|b| b % 4) {
        Some(0) => Some(AppleMode::Dfu),
        Some(1) => Some(AppleMode::PortDfu),
        Some(2) => Some(AppleMode::Recovery),
        _ => None,
    };

    let fields = serial::parse(&serial);
    // Whatever was read re-reads from its canonical spelling.
    if let Some(cpid) = fields.cpid {
        assert_eq!(serial::parse(&format!("CPID:{cpid:X}")).cpid, Some(cpid));
    }
    if let Some(ecid) = fields.ecid {
        assert_eq!(serial::parse(&format!("ECID:{ecid:016X}")).ecid, Some(ecid));
    }
    if let Some(n) = &fields.nonc {
        assert!(!n.is_empty());
        let again = serial::parse(&format!("NONC:{}", hex::encode(n)));
        assert_eq!(again.nonc.as_ref(), Some(n));
    }
    if let Some(t) = &fields.srtg {
        assert!(!t.contains(']'));
    }

    let id = DeviceIdentity::from_strings(mode, &serial, nonce.as_deref());
    if mode == Some(AppleMode::PortDfu) {
        assert!(!matches!(id.cpid, Some(c) if c > 0xFFFF));
        assert!(!matches!(id.bdid, Some(b) if b > 0xFF));
        if let (Some(raw), Some(n)) = (&id.ap_nonce, id.ap_nonce_for_tss()) {
            assert!(raw.iter().rev().eq(n.iter()));
        }
    }
    if let Some(m) = id.model {
        assert_eq!((Some(m.cpid), Some(m.bdid)), (id.cpid, id.bdid));
        assert!(id.require_model().is_ok());
    } else {
        assert!(id.require_model().is_err());
    }
    assert!(!id.situation().to_string().is_empty());
    let json = serde_json::to_string(&id.report()).expect("a report always serialises");
    assert!(json.starts_with('{'));
}

/// Every descriptor parser over the same bytes, with round-trip checks on success.
pub fn descriptors(data: &[u8]) {
    if let Ok(d) = DeviceDescriptor::parse(data) {
        let bytes = d.emit();
        assert_eq!(&bytes[..], &data[..DeviceDescriptor::LEN]);
        assert_eq!(DeviceDescriptor::parse(&bytes), Ok(d));
    }

    if let Ok(c) = ConfigDescriptor::parse(data) {
        match c.emit() {
            Ok(bytes) => {
                assert_eq!(ConfigDescriptor::parse(&bytes).as_ref(), Ok(&c));
                // Same descriptors, maybe regrouped: the total length cannot change.
                let total = ConfigDescriptor::total_length(data).expect("parsed before");
                assert_eq!(bytes.len(), usize::from(total));
            }
            // Only counts that do not fit a byte can fail to re-emit.
            Err(DescriptorError::TooLong { .. }) => assert!(
                c.interfaces.len() > 255
                    || c.interfaces
                        .iter()
                        .flat_map(|i| &i.alt_settings)
                        .any(|a| a.endpoints.len() > 255)
            ),
            Err(e) => panic!("a parsed configuration failed to emit: {e}"),
        }
        for interface in &c.interfaces {
            assert!(!interface.alt_settings.is_empty());
        }
    }

    if let Ok(s) = parse_string(data) {
        let bytes = emit_string(&s).expect("a parsed string fits a descriptor");
        assert_eq!(parse_string(&bytes).as_deref(), Ok(s.as_str()));
    }

    if let Ok(ids) = parse_language_ids(data) {
        let bytes = emit_language_ids(&ids).expect("parsed language IDs fit a descriptor");
        assert_eq!(parse_language_ids(&bytes), Ok(ids));
    }
}
