//! TSS response parsing against real server output quoted in idevicerestore issues and a
//! real SHSH2 (which is a saved TSS response plist).

use std::path::PathBuf;

use restore_agent::img4::im4m;
use restore_agent::tss::{self, TssError};

fn shared() -> PathBuf {
    std::env::var_os("MACRESCUE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared")))
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(shared().join("fixtures/tss").join(name)).unwrap()
}

fn excerpts() -> String {
    String::from_utf8(read("tss-request-response-excerpts-from-issues.txt")).unwrap()
}

fn section(tag: &str) -> String {
    excerpts()
        .split("==========")
        .find(|s| s.contains(tag))
        .unwrap()
        .to_string()
}

#[test]
fn full_response_yields_the_ticket() {
    let plist = read("iPhone9,3_d101ap_13.5-17F75.shsh2");
    let mut body = b"STATUS=0&MESSAGE=SUCCESS&REQUEST_STRING=".to_vec();
    body.extend_from_slice(&plist);
    let r = tss::parse_response(&body).unwrap();
    assert_eq!(r.status, 0);
    assert_eq!(r.message, "SUCCESS");
    assert_eq!(
        r.tickets.get("@ServerVersion").and_then(|v| v.as_string()),
        Some("2.1.0")
    );
    let ticket = r.ap_img4_ticket().unwrap();
    assert_eq!(ticket.len(), 6554);
    let m = im4m::parse(ticket).unwrap();
    assert_eq!(m.chip_id(), Some(0x8010));
    assert_eq!(r.ticket("BBTicket").unwrap().len(), 1096);
    assert_eq!(r.tbm("SEP"), None);
}

#[test]
fn truncated_response_from_issue_666_is_garbled_not_a_panic() {
    let s = section("issues/666");
    let start = s.find("<?xml").unwrap();
    let end = s.find("[... gap").unwrap();
    let partial = &s[start..end];
    assert!(partial.contains("<key>ApImg4Ticket</key>"));
    let body = format!("STATUS=0&MESSAGE=SUCCESS&REQUEST_STRING={partial}");
    assert!(matches!(
        tss::parse_response(body.as_bytes()),
        Err(TssError::GarbledResponse(_))
    ));
    // Every prefix of the real response either parses or errors; none panics.
    let full = format!(
        "STATUS=0&MESSAGE=SUCCESS&REQUEST_STRING={}",
        String::from_utf8(read("iPhone9,3_d101ap_13.5-17F75.shsh2")).unwrap()
    );
    for cut in (0..full.len()).step_by(211) {
        let r = tss::parse_response(&full.as_bytes()[..cut]);
        assert!(r.is_err(), "prefix {cut} unexpectedly parsed");
    }
}

#[test]
fn not_eligible_from_issue_693() {
    // The title quotes libtatsu's rendering of Apple's answer: status=94, message=…
    let s = section("issues/693");
    let from = s.find("status=").unwrap() + "status=".len();
    let (status, rest) = s[from..].split_once(", message=").unwrap();
    let message = rest.split_once(")\"").unwrap().0;
    assert_eq!(
        message,
        "This device isn't eligible for the requested build."
    );
    let body = format!("STATUS={status}&MESSAGE={message}");
    let err = tss::parse_response(body.as_bytes()).unwrap_err();
    match &err {
        TssError::NotSigned { status, message: m } => {
            assert_eq!(*status, 94);
            assert_eq!(m, message);
        }
        other => panic!("wrong error {other:?}"),
    }
    assert!(!err.is_retryable());
    let text = err.to_string();
    assert!(text.contains("pick another"), "{text}");
}

#[test]
fn network_failures_are_retryable() {
    for body in [
        &b""[..],
        b"<html><body>504 Gateway Time-out</body></html>",
        b"\x00\xff",
    ] {
        let err = tss::parse_response(body).unwrap_err();
        assert!(matches!(err, TssError::NoStatus), "{body:?}");
        assert!(err.is_retryable());
    }
}

#[test]
fn arbitrary_bytes_never_panic() {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let seeds: [&[u8]; 4] = [
        b"STATUS=0&MESSAGE=SUCCESS&REQUEST_STRING=<?xml version=\"1.0\"?><plist><dict><key>ApImg4Ticket</key><data>MAA=</data></dict></plist>",
        b"STATUS=94&MESSAGE=x",
        b"STATUS=&MESSAGE=&REQUEST_STRING=",
        b"STATUS=0&MESSAGE=SUCCESS&REQUEST_STRING=<?xml",
    ];
    for i in 0..4000 {
        let mut b = seeds[i % seeds.len()].to_vec();
        for _ in 0..(next() % 4) {
            let at = (next() as usize) % b.len();
            b[at] = next() as u8;
        }
        let cut = (next() as usize) % (b.len() + 1);
        let _ = tss::parse_response(&b[..cut]);
        let _ = tss::parse_response(&b);
    }
}
