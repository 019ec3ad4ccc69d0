//! Tickets (IM4M) signed by the simulator's test key, and the check the simulated Mac applies.
//!
//! # The test key
//! ECDSA P-384 with SHA-384 (`ring`, fixed-length signature: 96 bytes `r || s`, so a ticket's
//! length does not depend on the signature and image sizes can be planned). The private scalar is derived in code:
//! `d = SHA-384(TEST_KEY_SEED)` read big-endian (it is below the group order, so no reduction is
//! needed); [`TEST_PUBLIC_KEY`] is the matching uncompressed point, computed once offline and
//! proven consistent by `ring` itself every time the key is loaded (`from_private_key_and_public_key`
//! recomputes the point and rejects a mismatch). Nothing is stored in a key file, and every
//! mac-sim process (TSS server, `make-bootchain`, the USB/IP Mac) agrees on the key without
//! sharing state. It is a *test* key: anyone can sign with it.
//!
//! # Ticket layout (what the TSS server returns and `write_bootchain` embeds)
//! ```text
//! IM4M = SEQUENCE {
//!   IA5String "IM4M", INTEGER 0,
//!   SET { [PRIVATE MANB] SEQUENCE { "MANB", SET {
//!       [PRIVATE MANP] { "MANP", SET { BNCH?, BORD, CEPO, CHIP, CPRO, CSEC, ECID, SDOM, snon?, … } },
//!       [PRIVATE <4cc>] { <4cc>, SET { DGST, EKEY?, EPRO, ESEC } } …   -- one per component
//!   } } },
//!   OCTET STRING signature,        -- ECDSA-P384-SHA384, 96 bytes r||s, over the DER of the SET above
//!   SEQUENCE { IA5String "mac-sim test key", OCTET STRING <97-byte public key> }
//!                                  -- placeholder for Apple's certificate chain; never trusted
//! }
//! ```
//! * `DGST` = SHA-384 of the IM4P's whole DER **as the Mac receives it**, i.e. after the host's
//!   in-place 4CC rewrite for `Restore*` components (§5.2, §12.12). So a manifest's `Digest` for
//!   `RestoreKernelCache` is over the kernelcache IM4P carrying `rkrn`, for `KernelCache` over the
//!   same file carrying `krnl`.
//! * `BNCH` = the request's `ApNonce` bytes verbatim. The nonce a Mac shows (`NONC`) is already
//!   Apple's hash of its boot-nonce generator, and real tickets carry exactly those bytes; no
//!   further hashing or truncation is applied. `snon` likewise carries `ApSepNonce` verbatim.
//! * `ECID` 0 is the simulator's "any unit" convention (used by `write_bootchain`); TSS tickets
//!   always carry the request's ECID.
//! * Other MANP properties the TSS server adds (`lobo`, `nsih`, `ronh`, `vuid`, `srvn`) are signed
//!   but not checked by the Mac.
//!
//! The Mac accepts a ticket only if the signature verifies with [`TEST_PUBLIC_KEY`], `CHIP`,
//! `BORD` and `SDOM` equal its own, `ECID` is its ECID (or 0), `BNCH` (when present and the Mac
//! knows its nonce) equals its current ApNonce, and the image's component has a `DGST` equal to
//! SHA-384 of the received IM4P.

use std::sync::OnceLock;

use ring::signature::{self, EcdsaKeyPair, UnparsedPublicKey};
use sha2::{Digest, Sha384};

use crate::img4::{encode, FourCc, Im4m, PropValue, Tag, Value};

/// The seed the test private key is derived from (see the module documentation).
pub const TEST_KEY_SEED: &[u8] = b"mac-sim test TSS signing key, v1 (not Apple's; tests only)";

/// Uncompressed P-384 public key (`04 || X || Y`) of the key derived from [`TEST_KEY_SEED`].
pub const TEST_PUBLIC_KEY: [u8; 97] = [
    0x04, 0x0f, 0x18, 0xf2, 0xc4, 0x9a, 0xe6, 0x62, 0x43, 0x31, 0x69, 0x00, 0xf6, 0x90, 0x83, 0xf7,
    0xf9, 0x3d, 0xc0, 0x8f, 0x35, 0x70, 0x49, 0xff, 0xf8, 0x07, 0x29, 0xd7, 0x6b, 0x74, 0x79, 0xfa,
    0x80, 0x33, 0x55, 0xdb, 0x98, 0xbe, 0x7f, 0x92, 0x01, 0xf3, 0x03, 0xf7, 0x12, 0x7c, 0xaf, 0xb8,
    0x76, 0xae, 0xd1, 0x38, 0xfd, 0x4b, 0x14, 0xd2, 0xed, 0x8e, 0x84, 0x7b, 0x8a, 0x6d, 0xbe, 0xf5,
    0x36, 0x0c, 0x90, 0x8c, 0x76, 0x78, 0xa4, 0x09, 0x21, 0x38, 0x79, 0xe0, 0x8f, 0x53, 0x7d, 0x86,
    0x6d, 0x75, 0xe1, 0x1c, 0x44, 0x43, 0x81, 0x7c, 0xe4, 0xe3, 0x27, 0x41, 0xf2, 0x46, 0x55, 0x02,
    0xba,
];

/// Name in the certificate placeholder, so a reader can tell a simulator ticket at a glance.
pub const CERT_PLACEHOLDER_NAME: &[u8] = b"mac-sim test key";

fn key() -> &'static EcdsaKeyPair {
    static KEY: OnceLock<EcdsaKeyPair> = OnceLock::new();
    KEY.get_or_init(|| {
        let d = Sha384::digest(TEST_KEY_SEED);
        // The constant pair is checked by `ring` here and by the unit test below; a mismatch
        // is a programming error in this file, not a runtime condition.
        EcdsaKeyPair::from_private_key_and_public_key(
            &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
            &d,
            &TEST_PUBLIC_KEY,
            &ring::rand::SystemRandom::new(),
        )
        .expect("TEST_PUBLIC_KEY matches SHA-384(TEST_KEY_SEED)")
    })
}

/// Sign `message` with the test key (96 bytes: `r || s`).
pub fn sign(message: &[u8]) -> Vec<u8> {
    let rng = ring::rand::SystemRandom::new();
    // Signing only fails when the system RNG fails, which leaves nothing sensible to do.
    key()
        .sign(&rng, message)
        .expect("the system random generator works")
        .as_ref()
        .to_vec()
}

/// Does `sig` sign `message` under the test key?
pub fn verify_signature(message: &[u8], sig: &[u8]) -> bool {
    UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, &TEST_PUBLIC_KEY)
        .verify(message, sig)
        .is_ok()
}

/// One component object of a ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentEntry {
    pub fourcc: FourCc,
    /// SHA-384 of the IM4P (see the module documentation).
    pub digest: Vec<u8>,
    pub epro: bool,
    pub esec: bool,
    /// `EKEY`, from the manifest's `Trusted` (absent when the entry has none).
    pub ekey: Option<bool>,
}

/// What a ticket personalizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketSpec {
    pub chip: u32,
    pub board: u32,
    /// 0 = valid for any ECID (simulator convention).
    pub ecid: u64,
    pub security_domain: u32,
    pub production: bool,
    pub security: bool,
    /// `BNCH`: the ApNonce, verbatim.
    pub ap_nonce: Option<Vec<u8>>,
    /// `snon`: the SEP nonce, verbatim.
    pub sep_nonce: Option<Vec<u8>>,
    /// More MANP properties (`lobo`, `nsih` …).
    pub extra: Vec<(FourCc, PropValue)>,
    pub components: Vec<ComponentEntry>,
}

impl TicketSpec {
    /// A ticket for the given digests with EPRO/ESEC = production/security and no nonce.
    pub fn simple(
        chip: u32,
        board: u32,
        ecid: u64,
        security_domain: u32,
        digests: Vec<(FourCc, Vec<u8>)>,
    ) -> TicketSpec {
        TicketSpec {
            chip,
            board,
            ecid,
            security_domain,
            production: true,
            security: true,
            ap_nonce: None,
            sep_nonce: None,
            extra: Vec::new(),
            components: digests
                .into_iter()
                .map(|(fourcc, digest)| ComponentEntry {
                    fourcc,
                    digest,
                    epro: true,
                    esec: true,
                    ekey: None,
                })
                .collect(),
        }
    }
}

fn cc(s: &[u8; 4]) -> FourCc {
    FourCc(*s)
}

/// Build and sign an IM4M.
pub fn sign_im4m(t: &TicketSpec) -> Vec<u8> {
    let mut manp = vec![
        (cc(b"BORD"), PropValue::Integer(u64::from(t.board))),
        (cc(b"CEPO"), PropValue::Integer(0)),
        (cc(b"CHIP"), PropValue::Integer(u64::from(t.chip))),
        (cc(b"CPRO"), PropValue::Boolean(t.production)),
        (cc(b"CSEC"), PropValue::Boolean(t.security)),
        (cc(b"ECID"), PropValue::Integer(t.ecid)),
        (
            cc(b"SDOM"),
            PropValue::Integer(u64::from(t.security_domain)),
        ),
    ];
    if let Some(n) = &t.ap_nonce {
        manp.push((cc(b"BNCH"), PropValue::Data(n.clone())));
    }
    if let Some(n) = &t.sep_nonce {
        manp.push((cc(b"snon"), PropValue::Data(n.clone())));
    }
    manp.extend(t.extra.iter().cloned());
    let mut manb = vec![(cc(b"MANP"), PropValue::Set(manp))];
    for c in &t.components {
        let mut obj = vec![
            (cc(b"DGST"), PropValue::Data(c.digest.clone())),
            (cc(b"EPRO"), PropValue::Boolean(c.epro)),
            (cc(b"ESEC"), PropValue::Boolean(c.esec)),
        ];
        if let Some(k) = c.ekey {
            obj.push((cc(b"EKEY"), PropValue::Boolean(k)));
        }
        manb.push((c.fourcc, PropValue::Set(obj)));
    }
    let mut certs = encode(Tag::IA5_STRING, CERT_PLACEHOLDER_NAME);
    certs.extend(encode(Tag::OCTET_STRING, &TEST_PUBLIC_KEY));
    crate::img4::build_im4m_with(manb, sign, &encode(Tag::SEQUENCE, &certs))
}

/// Why the simulated Mac refuses a ticket.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("ticket is not signed: the image was personalized without a TSS signature")]
    NoSignature,
    #[error("ticket signature does not verify with the trusted (test) key: the ticket is forged, altered or signed by someone else — personalize it again with the TSS server")]
    BadSignature,
    #[error("ticket lacks {0}")]
    MissingProperty(&'static str),
    #[error(
        "ticket is for {what} {found:#x}, this Mac has {want:#x}: personalized for another Mac"
    )]
    WrongDevice {
        what: &'static str,
        found: u64,
        want: u64,
    },
    #[error("ticket was issued for ApNonce {found}, this Mac's nonce is {want}: the nonce changed; request a new ticket")]
    NonceMismatch { found: String, want: String },
}

/// The Mac's side of the check.
#[derive(Debug, Clone, Copy)]
pub struct Expect<'a> {
    pub chip: u32,
    pub board: u32,
    pub security_domain: u32,
    /// None: ECID not checked (the caller does not know it).
    pub ecid: Option<u64>,
    /// None: BNCH not checked.
    pub ap_nonce: Option<&'a [u8]>,
}

/// Verify signature and device binding of a parsed ticket (not the component digest).
pub fn check(m: &Im4m<'_>, e: &Expect<'_>) -> Result<(), TicketError> {
    let sig = m.signature.ok_or(TicketError::NoSignature)?;
    if !verify_signature(m.signed_set, sig) {
        return Err(TicketError::BadSignature);
    }
    let want = |name: &'static str, want: u64| -> Result<(), TicketError> {
        let found = m
            .manp_uint(name)
            .ok_or(TicketError::MissingProperty(name))?;
        if found != want {
            return Err(TicketError::WrongDevice {
                what: name,
                found,
                want,
            });
        }
        Ok(())
    };
    want("CHIP", u64::from(e.chip))?;
    want("BORD", u64::from(e.board))?;
    want("SDOM", u64::from(e.security_domain))?;
    let ticket_ecid = m
        .manp_uint("ECID")
        .ok_or(TicketError::MissingProperty("ECID"))?;
    if let Some(ecid) = e.ecid {
        if ticket_ecid != 0 && ticket_ecid != ecid {
            return Err(TicketError::WrongDevice {
                what: "ECID",
                found: ticket_ecid,
                want: ecid,
            });
        }
    }
    if let (Some(bnch), Some(nonce)) = (manp_data(m, "BNCH"), e.ap_nonce) {
        if bnch != nonce {
            return Err(TicketError::NonceMismatch {
                found: hex::encode(bnch),
                want: hex::encode(nonce),
            });
        }
    }
    Ok(())
}

fn manp_data<'a>(m: &Im4m<'a>, name: &str) -> Option<&'a [u8]> {
    match crate::img4::find(m.manp()?, name)?.value {
        Value::Data(d) => Some(d),
        _ => None,
    }
}

/// SHA-384 as a Vec (manifest digests, DGST values).
pub fn sha384(data: &[u8]) -> Vec<u8> {
    Sha384::digest(data).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::KeyPair;

    fn spec() -> TicketSpec {
        let mut t = TicketSpec::simple(
            0x8103,
            0x22,
            0x1122,
            1,
            vec![(cc(b"ibss"), vec![7; 48]), (cc(b"ibec"), vec![8; 48])],
        );
        t.ap_nonce = Some(vec![0xAB; 32]);
        t.sep_nonce = Some(vec![0xCD; 20]);
        t
    }

    fn expect(nonce: &[u8]) -> Expect<'_> {
        Expect {
            chip: 0x8103,
            board: 0x22,
            security_domain: 1,
            ecid: Some(0x1122),
            ap_nonce: Some(nonce),
        }
    }

    #[test]
    fn key_pair_is_consistent() {
        assert_eq!(key().public_key().as_ref(), &TEST_PUBLIC_KEY[..]);
        let sig = sign(b"hello");
        assert_eq!(sig.len(), 96);
        assert!(verify_signature(b"hello", &sig));
        assert!(!verify_signature(b"hellO", &sig));
    }

    #[test]
    fn signed_ticket_has_the_documented_layout() {
        let raw = sign_im4m(&spec());
        let m = Im4m::parse(&raw).unwrap();
        assert_eq!(m.version, 0);
        assert_eq!(m.manp_uint("CHIP"), Some(0x8103));
        assert_eq!(m.manp_uint("ECID"), Some(0x1122));
        assert_eq!(m.manp_data("BNCH"), Some(&[0xAB; 32][..]));
        assert_eq!(m.manp_data("snon"), Some(&[0xCD; 20][..]));
        assert_eq!(m.digest_of(cc(b"ibec")), Some(&[8u8; 48][..]));
        assert!(verify_signature(m.signed_set, m.signature.unwrap()));
        let certs = m.certificates.unwrap();
        assert_eq!(certs[0], 0x30);
        assert!(certs.windows(16).any(|w| w == CERT_PLACEHOLDER_NAME));
        assert_eq!(check(&m, &expect(&[0xAB; 32])), Ok(()));
    }

    #[test]
    fn tampering_is_detected() {
        let raw = sign_im4m(&spec());
        let m = Im4m::parse(&raw).unwrap();
        // Wrong nonce, ECID, board.
        assert!(matches!(
            check(&m, &expect(&[0xAC; 32])),
            Err(TicketError::NonceMismatch { .. })
        ));
        let mut e = expect(&[0xAB; 32]);
        e.ecid = Some(0x1123);
        assert!(matches!(
            check(&m, &e),
            Err(TicketError::WrongDevice { what: "ECID", .. })
        ));
        // A byte of the signed set changed (ECID 0x1122 → 0x1123): signature fails.
        let mut bad = raw.clone();
        let pos = bad
            .windows(4)
            .position(|w| w == [2, 2, 0x11, 0x22])
            .unwrap();
        bad[pos + 3] = 0x23;
        let m2 = Im4m::parse(&bad).unwrap();
        assert_eq!(m2.manp_uint("ECID"), Some(0x1123));
        assert_eq!(
            check(&m2, &expect(&[0xAB; 32])),
            Err(TicketError::BadSignature)
        );
        // A ticket whose signature was made by another key.
        let other = crate::img4::build_im4m_with(
            vec![(cc(b"MANP"), PropValue::Set(vec![]))],
            |_| vec![1; 96],
            &[],
        );
        let m3 = Im4m::parse(&other).unwrap();
        assert_eq!(
            check(&m3, &expect(&[0xAB; 32])),
            Err(TicketError::BadSignature)
        );
    }
}
