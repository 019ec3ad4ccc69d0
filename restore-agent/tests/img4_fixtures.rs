//! IMG4 parsing and stitching against real containers (PyIMG4 test files, an Apple-signed
//! ticket from an SHSH2 blob).

use std::path::PathBuf;

use restore_agent::img4::{self, der, im4m, im4p, im4r, Img4Error};

fn shared() -> PathBuf {
    std::env::var_os("MACRESCUE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared")))
}

fn fixture(name: &str) -> Vec<u8> {
    let p = shared().join("fixtures/tss").join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn pyimg4_ticket_shows_what_it_covers() {
    let m = im4m::parse(&fixture("PyIMG4-IM4M.der")).unwrap();
    assert_eq!(m.version, 0);
    assert!(m.signed);
    assert_eq!(m.chip_id(), Some(0x8015));
    assert_eq!(m.board_id(), Some(0x0E));
    assert_eq!(m.ecid(), Some(0x1234_5678_9012));
    assert_eq!(m.security_domain(), Some(1));
    assert_eq!(m.production_mode(), Some(true));
    assert_eq!(m.security_mode(), Some(true));
    let pattern = [0x01, 0x23, 0x45, 0x67, 0x89];
    let bnch = m.ap_nonce_hash().unwrap();
    assert_eq!(bnch.len(), 32);
    assert!(bnch.iter().zip(pattern.iter().cycle()).all(|(a, b)| a == b));
    assert_eq!(m.sep_nonce_hash().unwrap().len(), 20);
    assert_eq!(m.components.len(), 35);

    let ibss = m.component(b"ibss").unwrap();
    assert_eq!(ibss.digest().unwrap().len(), 48);
    assert_eq!(&ibss.digest().unwrap()[..4], &[0x98, 0x20, 0xEB, 0x87]);
    assert_eq!(ibss.epro(), Some(true));
    assert_eq!(ibss.esec(), Some(true));
    assert_eq!(ibss.ekey(), Some(true));
    assert_eq!(m.component(b"acfw").unwrap().ekey(), Some(false));
    assert_eq!(m.component(b"ftap").unwrap().digest().unwrap().len(), 32);
    assert!(m.component(b"zzzz").is_none());
    let summary = m.to_string();
    assert!(
        summary.starts_with(
            "ticket for ECID 0x123456789012, CHIP 0x8015, BORD 0xE, SDOM 0x1, production true, security true\n  ApNonce hash (BNCH) 0123456789012345…\n"
        ),
        "{summary}"
    );
    assert!(summary.contains("\n  35 components:\n"), "{summary}");
    assert!(
        summary.contains("\n    ibss (iBSS) DGST 9820eb8715b8"),
        "{summary}"
    );
    assert!(
        summary.contains(" EPRO=true ESEC=true EKEY=true\n"),
        "{summary}"
    );
    // Every component 4CC the ticket names that our table knows maps back to a component.
    for (tag, _) in &m.components {
        if let Some(name) = img4::fourcc::component_for_fourcc(*tag) {
            assert_eq!(img4::fourcc::table_fourcc(name), Some(*tag));
        }
    }
}

#[test]
fn shsh2_ticket_parses() {
    let blob: plist::Dictionary =
        plist::from_bytes(&fixture("iPhone9,3_d101ap_13.5-17F75.shsh2")).unwrap();
    let ticket = blob.get("ApImg4Ticket").and_then(|v| v.as_data()).unwrap();
    let m = im4m::parse(ticket).unwrap();
    assert_eq!(m.chip_id(), Some(0x8010));
    assert_eq!(m.board_id(), Some(0x0C));
    assert_eq!(m.ecid(), Some(3_685_821_359_199_014));
    assert!(m.component(b"aopf").unwrap().ekey().is_none());
}

#[test]
fn pyimg4_container_is_reproduced_byte_for_byte() {
    let whole = fixture("PyIMG4-IMG4-test.der");
    let parts = img4::parse_img4(&whole).unwrap();
    let payload = &whole[parts.im4p.clone()];
    let ticket = &whole[parts.im4m.clone().unwrap()];
    assert_eq!(parts.im4r, None);
    assert_eq!(ticket, fixture("PyIMG4-IM4M.der").as_slice());
    let p = im4p::parse(payload).unwrap();
    assert_eq!(p.fourcc, *b"test");
    assert_eq!(p.description, "Test Image4 payload.");
    assert_eq!(p.payload.len(), 0xC110);

    // A component outside the rewrite table keeps the payload's own tag: identical output.
    let stitched = img4::stitch("iBSS", payload, ticket, None).unwrap();
    assert_eq!(stitched, whole);
}

#[test]
fn stitch_round_trips_with_im4r_and_rewrite() {
    let whole = fixture("PyIMG4-IMG4-test.der");
    let parts = img4::parse_img4(&whole).unwrap();
    let payload = &whole[parts.im4p.clone()];
    let ticket = fixture("PyIMG4-IM4M.der");
    let im4r = fixture("PyIMG4-IM4R.der");

    let out = img4::stitch("RestoreKernelCache", payload, &ticket, Some(&im4r)).unwrap();
    let got = img4::parse_img4(&out).unwrap();
    assert_eq!(&out[got.im4m.unwrap()], ticket.as_slice());
    assert_eq!(&out[got.im4r.unwrap()], im4r.as_slice());
    let p = im4p::parse(&out[got.im4p.clone()]).unwrap();
    assert_eq!(p.fourcc, *b"rkrn");
    // The IM4P differs from the input in exactly the 4 type bytes.
    let patched = &out[got.im4p];
    assert_eq!(patched.len(), payload.len());
    let diffs = patched.iter().zip(payload).filter(|(a, b)| a != b).count();
    assert_eq!(diffs, 4);
    // Outer header: SEQUENCE with minimal long-form length covering everything.
    let outer = der::read(&out).unwrap();
    assert_eq!(outer.end(), out.len());

    // Rewriting in place gives the same IM4P as the stitched one.
    let mut in_place = payload.to_vec();
    assert_eq!(
        im4p::rewrite_fourcc("RestoreKernelCache", &mut in_place).unwrap(),
        Some(*b"rkrn")
    );
    assert_eq!(in_place, patched);
}

#[test]
fn built_im4r_is_accepted_by_stitch_and_parser() {
    let ticket = fixture("PyIMG4-IM4M.der");
    let r = im4r::build(
        "RestoreSEP",
        &im4r::Im4rInputs {
            tbm: Some(im4r::TbmData {
                ucon: vec![0xAA; 40],
                ucer: vec![0xBB; 40],
            }),
            ..Default::default()
        },
    )
    .unwrap();
    let payload = im4p::build(*b"sepi", "AppleSEPOS-1", &[7; 300]);
    let out = img4::stitch("RestoreSEP", &payload, &ticket, Some(&r)).unwrap();
    let parts = img4::parse_img4(&out).unwrap();
    assert_eq!(&out[parts.im4r.unwrap()], r.as_slice());
    assert_eq!(im4p::parse(&out[parts.im4p]).unwrap().fourcc, *b"rsep");
}

#[test]
fn lpol_stitched_with_ticket_keeps_its_tag() {
    let ticket = fixture("PyIMG4-IM4M.der");
    let out = img4::stitch("Ap,LocalPolicy", &img4::LPOL_IM4P, &ticket, None).unwrap();
    let parts = img4::parse_img4(&out).unwrap();
    assert_eq!(&out[parts.im4p], &img4::LPOL_IM4P);
    assert_eq!(
        hex::encode(img4::lpol_digest()),
        // SHA-384 of the 22 documented bytes (computed independently with Python hashlib).
        LPOL_SHA384
    );
}

const LPOL_SHA384: &str = "d1015438c4a89172a3048d5eaebcb2de657775c66af868916aa79619023d8286a14610c725e491ce67f40cbd58b77872";

#[test]
fn ramdisk_sized_payload_uses_four_length_bytes() {
    let size = 101 * 1024 * 1024;
    let payload = im4p::build(*b"rdsk", "ramdisk", &vec![0u8; size]);
    assert_eq!(&payload[..2], &[0x30, 0x84]);
    let p = im4p::parse(&payload).unwrap();
    assert_eq!(p.payload.len(), size);
    let ticket = fixture("PyIMG4-IM4M.der");
    let out = img4::stitch("RestoreRamDisk", &payload, &ticket, None).unwrap();
    assert_eq!(&out[..2], &[0x30, 0x84]);
    let parts = img4::parse_img4(&out).unwrap();
    assert_eq!(parts.im4p.len(), payload.len());
    assert_eq!(im4p::parse(&out[parts.im4p]).unwrap().fourcc, *b"rdsk");
}

#[test]
fn truncated_inputs_are_errors() {
    let ticket = fixture("PyIMG4-IM4M.der");
    for cut in (0..ticket.len()).step_by(7) {
        assert!(im4m::parse(&ticket[..cut]).is_err(), "ticket cut at {cut}");
    }
    let whole = fixture("PyIMG4-IMG4-test.der");
    let im4p_range = img4::parse_img4(&whole).unwrap().im4p;
    for cut in (0..whole.len()).step_by(97) {
        assert!(
            img4::parse_img4(&whole[..cut]).is_err(),
            "img4 cut at {cut}"
        );
        if cut < im4p_range.end {
            let start = im4p_range.start;
            assert!(
                im4p::parse(&whole[start..cut.max(start)]).is_err(),
                "im4p cut at {cut}"
            );
        }
    }
    let payload = im4p::build(*b"ibss", "x", b"abc");
    assert!(img4::stitch("iBSS", &payload, &ticket[..100], None).is_err());
    assert!(img4::stitch("iBSS", &payload[..5], &ticket, None).is_err());
    assert!(matches!(
        img4::stitch("iBSS", &payload, &payload, None),
        Err(Img4Error::NotIm4m(_))
    ));
    assert!(matches!(
        img4::stitch("iBSS", &payload, &ticket, Some(&payload)),
        Err(Img4Error::BadIm4r(_))
    ));
}

#[test]
fn garbage_never_panics() {
    // Deterministic xorshift noise plus bit flips of real files.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let ticket = fixture("PyIMG4-IM4M.der");
    let whole = fixture("PyIMG4-IMG4-test.der");
    for i in 0..3000 {
        let len = (next() % 64) as usize;
        let noise: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let _ = der::read(&noise);
        let _ = im4m::parse(&noise);
        let _ = im4p::parse(&noise);
        let _ = img4::parse_img4(&noise);

        let mut t = ticket.clone();
        let at = (next() as usize) % t.len();
        t[at] ^= 1 << (i % 8);
        let _ = im4m::parse(&t);
        let mut w = whole[..600].to_vec();
        let at = (next() as usize) % w.len();
        w[at] = next() as u8;
        let _ = img4::parse_img4(&w);
        let _ = im4p::rewrite_fourcc("RestoreSEP", &mut w);
    }
}
