//! The simulated TSS against firmware-updater requests (protocol.md §4.9) built by hand from
//! the J413AP fixture (retimers, TCON): signed tickets bound to the coprocessor, and the
//! status of each way a request can be wrong.

use mac_sim::board::manifests_dir;
use mac_sim::img4::Im4m;
use mac_sim::services::tss::{parse_reply_body, TssConfig, TssService};
use mac_sim::ticket::{self, Expect};
use plist::{Dictionary, Value};

fn service() -> TssService {
    TssService::new(
        TssConfig::from_files(&[manifests_dir().join("J413AP.BuildManifest.plist")]).unwrap(),
    )
}

/// The identity carrying the retimer firmware.
fn identity() -> Dictionary {
    let v = Value::from_file(manifests_dir().join("J413AP.BuildManifest.plist")).unwrap();
    v.as_dictionary().unwrap()["BuildIdentities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_dictionary().unwrap().clone())
        .find(|i| {
            i["Manifest"]
                .as_dictionary()
                .unwrap()
                .contains_key("Timer,RTKitOS,1")
        })
        .unwrap()
}

fn header(ticket: &str) -> Dictionary {
    let mut r = Dictionary::new();
    r.insert("@HostPlatformInfo".into(), "mac".into());
    r.insert("@VersionInfo".into(), "libauthinstall-1104.0.9".into());
    r.insert(
        "@UUID".into(),
        "6B608AE8-F88E-0D75-62B0-1DB5A2323A7A".into(),
    );
    r.insert("@BBTicket".into(), Value::Boolean(true));
    r.insert(format!("@{ticket}"), Value::Boolean(true));
    r
}

/// Every `prefix` entry, Info removed, `flags` set (what §4.9 says the host sends).
fn entries(r: &mut Dictionary, prefix: &str, flags: &[(&str, bool)]) {
    for (name, e) in identity()["Manifest"].as_dictionary().unwrap() {
        if name.starts_with(prefix) {
            let mut e = e.as_dictionary().unwrap().clone();
            e.remove("Info");
            for (k, v) in flags {
                e.insert(k.to_string(), Value::Boolean(*v));
            }
            r.insert(name.clone(), Value::Dictionary(e));
        }
    }
}

const NONCE: [u8; 32] = [0x4E; 32];
const TIMER_ECID: u64 = 0x0123_4567_89AB;

fn timer_request() -> Dictionary {
    let mut r = header("Timer,Ticket");
    r.insert("Timer,BoardID,1".into(), Value::Integer(1.into()));
    r.insert("Timer,ChipID,1".into(), Value::Integer(0x6600.into()));
    r.insert("Timer,SecurityDomain,1".into(), Value::Integer(1.into()));
    r.insert("Timer,SecurityMode,1".into(), Value::Boolean(true));
    r.insert("Timer,ProductionMode,1".into(), Value::Boolean(true));
    r.insert("Timer,ECID,1".into(), Value::Integer(TIMER_ECID.into()));
    r.insert("Timer,Nonce,1".into(), Value::Data(NONCE.to_vec()));
    entries(&mut r, "Timer,", &[("EPRO", true), ("ESEC", true)]);
    r
}

fn xml(d: &Dictionary) -> Vec<u8> {
    let mut out = Vec::new();
    plist::to_writer_xml(&mut out, d).unwrap();
    out
}

fn status(svc: &TssService, r: &Dictionary) -> (u32, String) {
    let reply = svc.evaluate(&xml(r));
    (reply.status, reply.message)
}

#[test]
fn a_retimer_request_is_signed_for_the_retimer() {
    let svc = service();
    let reply = svc.evaluate(&xml(&timer_request()));
    assert_eq!(reply.status, 0, "{}", reply.message);
    let (_, _, plist) = parse_reply_body(&reply.body()).unwrap();
    let plist = plist.unwrap();
    let raw = plist["Timer,Ticket"].as_data().unwrap();
    assert!(!plist.contains_key("ApImg4Ticket"));
    let m = Im4m::parse(raw).unwrap();
    ticket::check(
        &m,
        &Expect {
            chip: 0x6600,
            board: 1,
            security_domain: 1,
            ecid: Some(TIMER_ECID),
            ap_nonce: Some(&NONCE),
        },
    )
    .unwrap();
}

#[test]
fn a_tcon_request_is_signed_with_its_production_flag() {
    let svc = service();
    let mut r = header("Baobab,Ticket");
    for (k, v) in [
        ("Baobab,BoardID", 7u64),
        ("Baobab,ChipID", 0x855),
        ("Baobab,ManifestEpoch", 0),
        ("Baobab,SecurityDomain", 1),
    ] {
        r.insert(k.into(), Value::Integer(v.into()));
    }
    r.insert(
        "Baobab,ECID".into(),
        Value::Data(vec![0, 0, 0, 0, 0, 0x0B, 0x0B, 0xAB]),
    );
    r.insert("Baobab,UpdateNonce".into(), Value::Data(vec![7; 20]));
    r.insert("Baobab,ProductionMode".into(), Value::Boolean(true));
    entries(&mut r, "Baobab,", &[("EPRO", true)]);
    let (s, m) = status(&svc, &r);
    assert_eq!(s, 0, "{m}");
    // EPRO must follow Baobab,ProductionMode.
    entries(&mut r, "Baobab,", &[("EPRO", false)]);
    assert_eq!(status(&svc, &r).0, 100);
}

#[test]
fn each_updater_failure_has_its_status() {
    let svc = service();
    let ok = timer_request();
    let with = |f: &dyn Fn(&mut Dictionary)| {
        let mut r = ok.clone();
        f(&mut r);
        status(&svc, &r)
    };
    // One field of the retimer's firmware entry changed; the reply's status.
    let with_field = |field: &str, v: Value| {
        with(&|r| {
            let e = r
                .get_mut("Timer,RTKitOS,1")
                .unwrap()
                .as_dictionary_mut()
                .unwrap();
            e.insert(field.into(), v.clone());
        })
        .0
    };
    // Missing coprocessor identifiers or nonce: malformed.
    let (s, m) = with(&|r| {
        r.remove("Timer,Nonce,1");
    });
    assert_eq!((s, m.contains("Timer,Nonce,1")), (100, true), "{m}");
    assert_eq!(
        with(&|r| {
            r.remove("@BBTicket");
        })
        .0,
        100
    );
    // A required manifest entry left out: malformed.
    let (s, m) = with(&|r| {
        r.remove("Timer,RestoreRTKitOS,2");
    });
    assert_eq!(
        (s, m.contains("Timer,RestoreRTKitOS,2")),
        (100, true),
        "{m}"
    );
    // Info left in: malformed.
    assert_eq!(
        with_field("Info", Value::Dictionary(Dictionary::new())),
        100
    );
    // Rules give EPRO true for a production AP.
    assert_eq!(with_field("EPRO", Value::Boolean(false)), 100);
    // Another build's digest, or a retimer chip the build does not have: not eligible.
    assert_eq!(with_field("Digest", Value::Data(vec![0; 32])), 94);
    assert_eq!(
        with(&|r| {
            r.insert("Timer,ChipID,1".into(), Value::Integer(0x1234.into()));
        })
        .0,
        94
    );
    // A coprocessor the simulator does not sign.
    let mut other = header("Frob,Ticket");
    other.insert("Frob,Nonce".into(), Value::Data(vec![1]));
    let (s, m) = status(&svc, &other);
    assert_eq!((s, m.contains("Frob,Ticket")), (100, true), "{m}");
}
