//! The simulated TSS against requests built by hand from fixture manifests (protocol.md §4),
//! in-process and over HTTP(S).

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

mod tss_request;

use mac_sim::board::manifests_dir;
use mac_sim::img4::{find, FourCc, Im4m, Value as DerValue};
use mac_sim::services::pki::TestPki;
use mac_sim::services::tss::{parse_reply_body, TssConfig, TssReply, TssService};
use mac_sim::ticket::{self, Expect, TicketError};
use plist::{Dictionary, Value};
use sha2::{Digest, Sha384};

const ECID: u64 = 0x001C_2B3A_4D5E_6F70;
use tss_request::{hexval, LPOL};

fn manifest_path(board: &str) -> std::path::PathBuf {
    manifests_dir().join(format!("{board}.BuildManifest.plist"))
}

fn service(board: &str) -> TssService {
    TssService::new(TssConfig::from_files(&[manifest_path(board)]).unwrap())
}

/// The restore identity (the one with iBSS).
fn identity(board: &str) -> Dictionary {
    let v = Value::from_file(manifest_path(board)).unwrap();
    v.as_dictionary().unwrap()["BuildIdentities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_dictionary().unwrap().clone())
        .find(|i| i["Manifest"].as_dictionary().unwrap().contains_key("iBSS"))
        .unwrap()
}

fn nonce() -> Vec<u8> {
    (0..32u8).collect()
}

fn main_request(id: &Dictionary, production: bool, recovery: bool) -> Dictionary {
    tss_request::main_request(id, ECID, &nonce(), production, recovery)
}

fn local_policy_request(id: &Dictionary, nsih: &[u8]) -> Dictionary {
    tss_request::local_policy_request(id, ECID, &nonce(), nsih)
}

fn xml(d: &Dictionary) -> Vec<u8> {
    let mut out = Vec::new();
    plist::to_writer_xml(&mut out, &Value::Dictionary(d.clone())).unwrap();
    out
}

fn expect_for(id: &Dictionary, nonce: &[u8]) -> Expect<'static> {
    Expect {
        chip: hexval(&id["ApChipID"]) as u32,
        board: hexval(&id["ApBoardID"]) as u32,
        security_domain: hexval(&id["ApSecurityDomain"]) as u32,
        ecid: Some(ECID),
        ap_nonce: Some(Box::leak(nonce.to_vec().into_boxed_slice())),
    }
}

fn obj_bool(m: &Im4m<'_>, cc: &[u8; 4], key: &str) -> Option<bool> {
    match find(m.object(FourCc(*cc))?, key)?.value {
        DerValue::Boolean(b) => Some(b),
        _ => None,
    }
}

#[test]
fn main_request_for_every_fixture_mac_is_signed() {
    for board in ["J274AP", "J414sAP", "J773sAP", "J613AP"] {
        let id = identity(board);
        let svc = service(board);
        let reply = svc.evaluate(&xml(&main_request(&id, true, false)));
        assert_eq!(
            (reply.status, reply.message.as_str()),
            (0, "SUCCESS"),
            "{board}"
        );
        let t = reply.ticket.unwrap();
        let m = Im4m::parse(&t).unwrap();
        assert_eq!(
            ticket::check(&m, &expect_for(&id, &nonce())),
            Ok(()),
            "{board}"
        );
        assert_eq!(m.manp_uint("ECID"), Some(ECID));
        assert_eq!(m.manp_data("BNCH"), Some(&nonce()[..]));
        assert_eq!(m.manp_data("snon"), Some(&[0x5E; 20][..]));
        let man = id["Manifest"].as_dictionary().unwrap();
        let digest = |n: &str| man[n].as_dictionary().unwrap()["Digest"].as_data().unwrap();
        assert_eq!(m.digest_of(FourCc(*b"ibss")), Some(digest("iBSS")));
        assert_eq!(m.digest_of(FourCc(*b"ibec")), Some(digest("iBEC")));
        assert_eq!(
            m.digest_of(FourCc(*b"rkrn")),
            Some(digest("RestoreKernelCache"))
        );
        assert_eq!(m.digest_of(FourCc(*b"krnl")), Some(digest("KernelCache")));
        assert_eq!(obj_bool(&m, b"ibss", "EPRO"), Some(true));
        assert_eq!(obj_bool(&m, b"ibss", "ESEC"), Some(true));
        assert_eq!(obj_bool(&m, b"ibss", "EKEY"), Some(true));
        // The ticket arrives in the documented body format.
        let (status, msg, pl) = parse_reply_body(&reply_body(&svc, &id)).unwrap();
        assert_eq!((status, msg.as_str()), (0, "SUCCESS"));
        let tk = pl.unwrap()["ApImg4Ticket"].as_data().unwrap().to_vec();
        assert!(Im4m::parse(&tk).is_ok());
    }
}

fn reply_body(svc: &TssService, id: &Dictionary) -> Vec<u8> {
    svc.evaluate(&xml(&main_request(id, true, false))).body()
}

#[test]
fn development_mode_follows_the_rules() {
    let id = identity("J274AP");
    let svc = service("J274AP");
    let req = main_request(&id, false, false);
    // The rules turn EPRO off for a demoted (development) request.
    assert_eq!(
        req["iBSS"].as_dictionary().unwrap()["EPRO"].as_boolean(),
        Some(false)
    );
    let reply = svc.evaluate(&xml(&req));
    assert_eq!(reply.status, 0, "{}", reply.message);
    let m_raw = reply.ticket.unwrap();
    let m = Im4m::parse(&m_raw).unwrap();
    assert_eq!(obj_bool(&m, b"ibss", "EPRO"), Some(false));
    // The production request's entries in a development request: wrong EPRO.
    let mut mixed = main_request(&id, false, false);
    mixed.insert(
        "iBSS".into(),
        main_request(&id, true, false)["iBSS"].clone(),
    );
    let r = svc.evaluate(&xml(&mixed));
    assert_eq!(r.status, 100);
    assert!(r.message.contains("iBSS.EPRO"), "{}", r.message);
}

fn status_of(svc: &TssService, req: &Dictionary) -> (u32, String) {
    let r = svc.evaluate(&xml(req));
    assert!(r.ticket.is_none() || r.status == 0);
    (r.status, r.message)
}

#[test]
fn each_validation_failure_has_its_status() {
    let id = identity("J274AP");
    let svc = service("J274AP");
    let good = main_request(&id, true, false);
    assert_eq!(status_of(&svc, &good).0, 0);
    let not_eligible = (
        94,
        "This device isn't eligible for the requested build.".to_string(),
    );

    // Not a plist / not a dictionary.
    assert_eq!(svc.evaluate(b"hello").status, 100);
    assert_eq!(
        svc.evaluate(&{
            let mut v = Vec::new();
            plist::to_writer_xml(&mut v, &Value::Array(vec![])).unwrap();
            v
        })
        .status,
        100
    );
    // Missing and mistyped keys.
    for k in [
        "ApECID",
        "ApNonce",
        "UniqueBuildID",
        "@ApImg4Ticket",
        "ApProductionMode",
        "@UUID",
    ] {
        let mut r = good.clone();
        r.remove(k);
        let (s, m) = status_of(&svc, &r);
        assert_eq!(s, 100, "{k}");
        assert!(m.contains(k), "{m}");
    }
    let mut r = good.clone();
    r.insert("ApECID".into(), Value::String("0x1C2B".into()));
    assert_eq!(status_of(&svc, &r).0, 100);
    let mut r = good.clone();
    r.insert("ApNonce".into(), Value::String("00".into()));
    assert_eq!(status_of(&svc, &r).0, 100);
    // Unknown build, another board, another security domain.
    let mut r = good.clone();
    r.insert("UniqueBuildID".into(), Value::Data(vec![1; 20]));
    assert_eq!(status_of(&svc, &r), not_eligible);
    let mut r = good.clone();
    r.insert("ApBoardID".into(), Value::Integer(0x23.into()));
    assert_eq!(status_of(&svc, &r), not_eligible);
    let mut r = good.clone();
    r.insert("ApSecurityDomain".into(), Value::Integer(0.into()));
    assert_eq!(status_of(&svc, &r), not_eligible);
    // A required component left out.
    let mut r = good.clone();
    r.remove("RestoreRamDisk");
    let (s, m) = status_of(&svc, &r);
    assert_eq!(s, 100);
    assert!(m.contains("RestoreRamDisk"), "{m}");
    // A digest of another build.
    let mut r = good.clone();
    let mut e = r["iBEC"].as_dictionary().unwrap().clone();
    e.insert("Digest".into(), Value::Data(vec![0xEE; 48]));
    r.insert("iBEC".into(), Value::Dictionary(e));
    assert_eq!(status_of(&svc, &r), not_eligible);
    // A rule not applied (ESEC dropped).
    let mut r = good.clone();
    let mut e = r["iBSS"].as_dictionary().unwrap().clone();
    e.remove("ESEC");
    r.insert("iBSS".into(), Value::Dictionary(e));
    assert_eq!(status_of(&svc, &r).0, 100);
    // Info left in.
    let mut r = good.clone();
    let mut e = r["iBEC"].as_dictionary().unwrap().clone();
    e.insert("Info".into(), Value::Dictionary(Dictionary::new()));
    r.insert("iBEC".into(), Value::Dictionary(e));
    assert_eq!(status_of(&svc, &r).0, 100);
}

#[test]
fn unsigned_builds_and_unlisted_ecids_are_not_eligible() {
    let id = identity("J274AP");
    let good = main_request(&id, true, false);
    let mut cfg = TssConfig::from_files(&[manifest_path("J274AP")]).unwrap();
    cfg.signed_builds = Some(HashSet::from(["25A1".to_string()]));
    let svc = TssService::new(cfg.clone());
    assert_eq!(status_of(&svc, &good).0, 94);
    cfg.signed_builds = Some(HashSet::from(["25C56".to_string()]));
    assert_eq!(status_of(&TssService::new(cfg.clone()), &good).0, 0);
    // Local-policy requests name no build, but the allow-list still applies to them.
    let lp = local_policy_request(&id, &[7; 48]);
    cfg.ecid_allow = Some(HashSet::from([ECID + 1]));
    assert_eq!(status_of(&TssService::new(cfg.clone()), &good).0, 94);
    assert_eq!(status_of(&TssService::new(cfg.clone()), &lp).0, 94);
    cfg.ecid_allow = Some(HashSet::from([ECID]));
    assert_eq!(status_of(&TssService::new(cfg.clone()), &good).0, 0);
    assert_eq!(status_of(&TssService::new(cfg), &lp).0, 0);
}

#[test]
fn tickets_fail_the_macs_check_when_tampered() {
    let id = identity("J274AP");
    let svc = service("J274AP");
    let t = svc
        .evaluate(&xml(&main_request(&id, true, false)))
        .ticket
        .unwrap();
    let m = Im4m::parse(&t).unwrap();
    // Another nonce (the Mac rebooted), another ECID.
    assert!(matches!(
        ticket::check(&m, &expect_for(&id, &[9; 32])),
        Err(TicketError::NonceMismatch { .. })
    ));
    let mut e = expect_for(&id, &nonce());
    e.ecid = Some(ECID + 1);
    assert!(matches!(
        ticket::check(&m, &e),
        Err(TicketError::WrongDevice { what: "ECID", .. })
    ));
    // Flip one byte of the iBSS digest inside the signed set: the signature fails.
    let digest = m.digest_of(FourCc(*b"ibss")).unwrap().to_vec();
    let pos = t.windows(48).position(|w| w == digest).unwrap();
    let mut bad = t.clone();
    bad[pos] ^= 1;
    let bm = Im4m::parse(&bad).unwrap();
    assert_eq!(
        ticket::check(&bm, &expect_for(&id, &nonce())),
        Err(TicketError::BadSignature)
    );
    // Flip a byte of the signature itself.
    let sig = m.signature.unwrap().to_vec();
    let pos = t.windows(96).position(|w| w == sig).unwrap();
    let mut bad = t.clone();
    bad[pos + 10] ^= 0x40;
    let bm = Im4m::parse(&bad).unwrap();
    assert_eq!(
        ticket::check(&bm, &expect_for(&id, &nonce())),
        Err(TicketError::BadSignature)
    );
}

#[test]
fn local_policy_and_recovery_root_requests() {
    let id = identity("J274AP");
    let svc = service("J274AP");
    let main = svc
        .evaluate(&xml(&main_request(&id, true, false)))
        .ticket
        .unwrap();
    let nsih = Sha384::digest(&main).to_vec();
    let r = svc.evaluate(&xml(&local_policy_request(&id, &nsih)));
    assert_eq!(r.status, 0, "{}", r.message);
    let t = r.ticket.unwrap();
    let m = Im4m::parse(&t).unwrap();
    assert_eq!(ticket::check(&m, &expect_for(&id, &nonce())), Ok(()));
    assert_eq!(
        m.digest_of(FourCc(*b"lpol")),
        Some(&Sha384::digest(LPOL)[..])
    );
    assert_eq!(m.manp_data("nsih"), Some(&nsih[..]));
    assert!(m.object(FourCc(*b"ibss")).is_none());
    // Wrong lpol digest, missing NextStageIM4MHash.
    let mut bad = local_policy_request(&id, &nsih);
    let mut lp = bad["Ap,LocalPolicy"].as_dictionary().unwrap().clone();
    lp.insert("Digest".into(), Value::Data(vec![0; 48]));
    bad.insert("Ap,LocalPolicy".into(), Value::Dictionary(lp));
    assert_eq!(status_of(&svc, &bad).0, 100);
    let mut bad = local_policy_request(&id, &nsih);
    bad.remove("Ap,NextStageIM4MHash");
    assert_eq!(status_of(&svc, &bad).0, 100);
    // Restore-mode local policy (§4.8): LocalBoot, no nonce, needs ronh and a 16-byte UUID.
    let mut lb = local_policy_request(&id, &nsih);
    lb.insert("Ap,LocalBoot".into(), true.into());
    lb.remove("ApNonce");
    assert_eq!(status_of(&svc, &lb).0, 100, "no ronh/vuid");
    lb.insert(
        "Ap,RecoveryOSPolicyNonceHash".into(),
        Value::Data(vec![3; 48]),
    );
    lb.insert("Ap,VolumeUUID".into(), Value::Data(vec![4; 16]));
    let r = svc.evaluate(&xml(&lb));
    assert_eq!(r.status, 0, "{}", r.message);
    let t = r.ticket.unwrap();
    let m = Im4m::parse(&t).unwrap();
    assert_eq!(m.manp_data("vuid"), Some(&[4u8; 16][..]));
    assert_eq!(m.manp_data("BNCH"), None);

    // Recovery-OS root ticket: no boot-chain stages, components without default EPRO/ESEC.
    let rec = main_request(&id, true, true);
    assert!(!rec.contains_key("iBSS"));
    let r = svc.evaluate(&xml(&rec));
    assert_eq!(r.status, 0, "{}", r.message);
    let t = r.ticket.unwrap();
    let m = Im4m::parse(&t).unwrap();
    assert!(m.object(FourCc(*b"ibss")).is_none());
    assert!(m.object(FourCc(*b"krnl")).is_some());
    let mut missing = rec.clone();
    missing.remove("KernelCache");
    assert_eq!(status_of(&svc, &missing).0, 100);
}

fn client(ca_pem: Option<&str>) -> reqwest::Client {
    let mut b = reqwest::Client::builder().use_rustls_tls().no_proxy();
    if let Some(pem) = ca_pem {
        b = b.add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap());
    }
    b.build().unwrap()
}

#[tokio::test]
async fn over_https_with_counting_and_faults() {
    let id = identity("J274AP");
    let svc = Arc::new(service("J274AP"));
    let pki = TestPki::generate(&[]).unwrap();
    let server = svc
        .start(
            "127.0.0.1:0".parse().unwrap(),
            Some(pki.server_config.clone()),
        )
        .await
        .unwrap();
    let url = format!("{}/TSS/controller?action=2", server.url());
    let c = client(Some(&pki.ca_pem));
    let body = xml(&main_request(&id, true, false));
    let post = || {
        c.post(&url)
            .header("Content-Type", "text/xml; charset=\"utf-8\"")
            .header("User-Agent", "InetURL/1.0")
            .body(body.clone())
            .send()
    };
    let text = post().await.unwrap().bytes().await.unwrap();
    let (status, msg, pl) = parse_reply_body(&text).unwrap();
    assert_eq!((status, msg.as_str()), (0, "SUCCESS"));
    assert!(pl.unwrap().contains_key("ApImg4Ticket"));
    assert!(text.starts_with(b"STATUS=0&MESSAGE=SUCCESS&REQUEST_STRING=<?xml"));
    assert_eq!(svc.requests(), 1);
    assert_eq!(
        svc.last_request().unwrap()["ApECID"],
        Value::Integer(ECID.into())
    );

    // Two dropped connections, then an answer.
    svc.faults.drop_next.store(2, Ordering::Relaxed);
    assert!(post().await.is_err());
    assert!(post().await.is_err());
    assert_eq!(post().await.unwrap().status(), 200);
    assert_eq!(svc.requests(), 4);

    svc.faults.always_94.store(true, Ordering::Relaxed);
    let text = post().await.unwrap().bytes().await.unwrap();
    assert_eq!(
        &text[..],
        &TssReply {
            status: 94,
            message: "This device isn't eligible for the requested build.".into(),
            ticket: None,
            ticket_key: String::new(),
        }
        .body()[..]
    );
    svc.faults.always_94.store(false, Ordering::Relaxed);
    svc.faults.http_500.store(true, Ordering::Relaxed);
    assert_eq!(post().await.unwrap().status(), 500);
    svc.faults.http_500.store(false, Ordering::Relaxed);

    // Wrong path.
    let r = c
        .post(format!("{}/TSS/other", server.url()))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(svc.requests(), 7);
}
