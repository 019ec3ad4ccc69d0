//! The simulated restore OS driven by a from-scratch test host (restore_host/): whole
//! scenarios, every reply validation, strictness counters and fault knobs.

#[path = "restore_host/mod.rs"]
mod host;

use std::sync::Arc;
use std::time::Duration;

use host::{Bad, Host, Job};
use mac_sim::restore::restored::{DeviceInfo, Outcome};
use mac_sim::restore::scenario::{DataRequest, ReverseProxy, Scenario, Step};
use mac_sim::restore::usbmux::Violation;
use mac_sim::restore::{RestoreConfig, RestoreHandle, RestoreOs};

const IMAGE: u64 = 3 * 1024 * 1024 + 777;

fn info() -> DeviceInfo {
    DeviceInfo {
        board_config: "j274ap".into(),
        cpid: 0x8103,
        bdid: 0x22,
        ecid: 0x001C_2B3A_4D5E_6F70,
        serial_number: "C02TESTSIM".into(),
    }
}

fn scenario(name: &str) -> Scenario {
    let mut s = Scenario::shipped(name).unwrap();
    s.image.size = IMAGE;
    s
}

fn run(s: Scenario, bad: Bad) -> (Result<(), String>, RestoreHandle, Host) {
    let behavior = s.behavior.clone();
    let job = Job {
        info: info(),
        behavior,
        image_seed: s.image.seed.unwrap(),
        image_size: s.image.size,
        proxy: s.reverse_proxy != ReverseProxy::Off,
        proxy_ping: s.reverse_proxy == ReverseProxy::Ping,
    };
    let cfg = RestoreConfig {
        timeout: Duration::from_secs(5),
        ..RestoreConfig::default()
    };
    let os = Arc::new(RestoreOs::start(s, info(), cfg));
    let handle = os.handle();
    let mut h = Host::new(os, bad);
    let r = h.restore(&job);
    handle.wait(Duration::from_secs(10));
    (r, handle, h)
}

#[test]
fn revive_scenario_restores_end_to_end() {
    let (r, handle, _) = run(scenario("mac-revive"), Bad::default());
    let rep = handle.report();
    assert_eq!(r, Ok(()), "{:#?}", rep.log);
    assert_eq!(rep.outcome, Outcome::Succeeded);
    assert_eq!(
        handle.violations().total(),
        0,
        "{:?}",
        handle.violations().log
    );
    let asr = rep.asr.unwrap();
    assert_eq!(asr.bytes, IMAGE);
    assert_eq!(asr.chunks, IMAGE.div_ceil(131072));
    assert_eq!(asr.oob_reads, 3);
    for dt in [
        "BuildIdentityDict",
        "RecoveryOSRootTicketData",
        "RecoveryOSLocalPolicy",
        "PersonalizedBootObjectV3",
        "SourceBootObjectV4",
        "BootabilityBundle",
        "RecoveryOSASRImage",
        "SystemImageData",
        "ReceiptManifest",
        "FirmwareUpdaterPreflight",
        "URLAsset",
    ] {
        assert!(
            rep.served.iter().any(|s| s == dt),
            "{dt} not served: {:?}",
            rep.served
        );
    }
    assert_eq!(rep.main_sessions, 1);
    assert_eq!(rep.proxy.unwrap().ctrl_version, Some(2));
}

#[test]
fn erase_scenario_restores_end_to_end_over_mux_v1() {
    let mut s = scenario("mac-erase");
    s.mux_version = 1;
    s.asr.reinitiate = true;
    s.asr.checksum_chunks = false;
    let (r, handle, _) = run(s, Bad::default());
    assert_eq!(r, Ok(()), "{:#?}", handle.report().log);
    assert_eq!(handle.outcome(), Outcome::Succeeded);
    assert_eq!(handle.violations().total(), 0);
}

fn expect_rejected(bad: Bad, step_contains: &str, reason_contains: &str) {
    let (r, handle, _) = run(scenario("mac-revive"), bad);
    let err = r.unwrap_err();
    match handle.outcome() {
        Outcome::Rejected { step, reason } => {
            assert!(step.contains(step_contains), "step {step}");
            assert!(reason.contains(reason_contains), "reason {reason}");
            assert!(err.contains(reason_contains), "host saw {err}");
        }
        o => panic!("expected a rejection, got {o:?} (host: {err})"),
    }
}

#[test]
fn wrong_build_identity_variant_is_rejected() {
    expect_rejected(
        Bad {
            wrong_variant: true,
            ..Bad::default()
        },
        "BuildIdentityDict",
        "does not contain \"Upgrade Install\"",
    );
}

#[test]
fn ticket_for_another_board_is_rejected() {
    expect_rejected(
        Bad {
            ticket_wrong_board: true,
            ..Bad::default()
        },
        "RecoveryOSRootTicketData",
        "BORD Some(35)",
    );
}

#[test]
fn local_policy_with_wrong_fourcc_is_rejected() {
    expect_rejected(
        Bad {
            lpol_wrong_fourcc: true,
            ..Bad::default()
        },
        "RecoveryOSLocalPolicy",
        "expected lpol",
    );
}

#[test]
fn oversized_file_data_chunk_is_rejected() {
    expect_rejected(
        Bad {
            big_file_chunk: true,
            ..Bad::default()
        },
        "PersonalizedBootObjectV3",
        "exceeds 8192",
    );
}

#[test]
fn xml_urlasset_reply_is_rejected() {
    expect_rejected(
        Bad {
            urlasset_xml: true,
            ..Bad::default()
        },
        "URLAsset",
        "binary plist",
    );
}

#[test]
fn asr_byte_error_is_found_at_its_offset() {
    expect_rejected(
        Bad {
            asr_corrupt_byte: Some(1_000_003),
            ..Bad::default()
        },
        "RecoveryOSASRImage",
        "at byte 1000003",
    );
}

#[test]
fn asr_bad_chunk_checksum_is_rejected() {
    expect_rejected(
        Bad {
            asr_bad_chunk_sha: true,
            ..Bad::default()
        },
        "RecoveryOSASRImage",
        "SHA-1 after chunk 1",
    );
}

#[test]
fn asr_bad_oob_and_wrong_size_are_rejected() {
    expect_rejected(
        Bad {
            asr_bad_oob: true,
            ..Bad::default()
        },
        "RecoveryOSASRImage",
        "OOB read of 4096 bytes at offset 0",
    );
    expect_rejected(
        Bad {
            asr_wrong_size: true,
            ..Bad::default()
        },
        "RecoveryOSASRImage",
        "Payload.Size",
    );
}

#[test]
fn missing_required_data_type_fails_is_host_compatible() {
    let (r, handle, _) = run(
        scenario("mac-revive"),
        Bad {
            missing_required_type: Some("BootabilityBundle".into()),
            ..Bad::default()
        },
    );
    let err = r.unwrap_err();
    assert!(err.contains("status 10"), "{err}");
    assert!(err.contains("(required): BootabilityBundle"), "{err}");
    assert!(matches!(handle.outcome(), Outcome::Rejected { step, .. } if step == "StartRestore"));
}

#[test]
fn wrong_restore_behavior_is_rejected() {
    let (r, handle, _) = run(
        scenario("mac-erase"),
        Bad {
            behavior: Some("Update".into()),
            ..Bad::default()
        },
    );
    assert!(r.unwrap_err().contains("AuthInstallRestoreBehavior"));
    assert!(matches!(handle.outcome(), Outcome::Rejected { .. }));
}

#[test]
fn missing_zlp_is_counted_and_breaks_the_restore() {
    let (r, handle, _) = run(
        scenario("mac-revive"),
        Bad {
            skip_zlp: true,
            ..Bad::default()
        },
    );
    assert!(r.is_err());
    assert!(handle.violations().count(Violation::MissingZlp) >= 1);
}

#[test]
fn window_overrun_is_counted() {
    let (r, handle, _) = run(
        scenario("mac-revive"),
        Bad {
            ignore_window: true,
            ..Bad::default()
        },
    );
    assert!(r.is_err());
    assert!(
        handle.violations().count(Violation::Window) >= 1,
        "{:?}",
        handle.violations()
    );
}

#[test]
fn missing_final_ack_is_reported() {
    let (r, handle, _) = run(
        scenario("mac-revive"),
        Bad {
            no_final_ack: true,
            ..Bad::default()
        },
    );
    assert_eq!(r, Ok(()));
    // The device times out waiting for ReceivedFinalStatusMsg.
    let o = handle.wait(Duration::from_secs(10));
    assert!(
        matches!(o, Outcome::Broken(ref w) if w.contains("StatusMsg")),
        "{o:?}"
    );
}

#[test]
fn slow_acks_still_succeed() {
    let mut s = scenario("mac-revive");
    s.image.size = 512 * 1024;
    s.faults.ack_delay_ms = 2;
    let (r, handle, _) = run(s, Bad::default());
    assert_eq!(r, Ok(()), "{:#?}", handle.report().log);
    assert_eq!(handle.outcome(), Outcome::Succeeded);
}

#[test]
fn disconnect_mid_asr_ends_with_a_fault() {
    let mut s = scenario("mac-revive");
    s.faults.disconnect_after_asr_bytes = Some(1 << 20);
    let (r, handle, _) = run(s, Bad::default());
    let err = r.unwrap_err();
    assert!(err.contains("gone"), "{err}");
    assert!(matches!(handle.outcome(), Outcome::Fault(ref w) if w.contains("dropped off the bus")));
}

#[test]
fn rst_on_the_asr_connection_fails_with_a_named_error() {
    let mut s = scenario("mac-revive");
    s.faults.rst_asr_after_bytes = Some(1 << 20);
    let (r, handle, _) = run(s, Bad::default());
    let err = r.unwrap_err();
    assert!(err.contains("asr: simulated connection reset"), "{err}");
    assert!(matches!(handle.outcome(), Outcome::Fault(_)));
    assert!(handle.stats().resets_sent >= 1);
}

#[test]
fn device_error_status_reaches_the_host_with_its_log() {
    let mut s = scenario("mac-revive");
    s.steps.insert(
        3,
        Step::StatusMsg {
            status: 14,
            log: Some("ramrod firmware update failed: update_aht".into()),
            amr_error: Some(3194),
        },
    );
    let (r, handle, _) = run(s, Bad::default());
    let err = r.unwrap_err();
    assert!(
        err.contains("status 14") && err.contains("update_aht"),
        "{err}"
    );
    assert_eq!(handle.outcome(), Outcome::DeviceFailed { status: 14 });
}

#[test]
fn unknown_data_type_makes_the_host_abort() {
    let mut s = scenario("mac-revive");
    s.steps.insert(
        2,
        Step::DataRequestMsg(DataRequest {
            data_type: "SimulatedFutureData".into(),
            arguments: Default::default(),
            data_port: None,
            expect_variant: None,
            expect_host_abort: true,
            expect_ticket: None,
            expect_firmware: None,
        }),
    );
    let (r, handle, _) = run(s, Bad::default());
    assert!(r.unwrap_err().contains("SimulatedFutureData"));
    assert_eq!(
        handle.wait(Duration::from_secs(5)),
        Outcome::HostAborted {
            data_type: "SimulatedFutureData".into()
        }
    );
}

fn small(name: &str) -> Scenario {
    let mut s = scenario(name);
    s.image.size = 300_000;
    s
}

#[test]
fn reverse_proxy_ping_over_v2_and_v1() {
    for v1 in [false, true] {
        let mut s = small("mac-revive");
        s.reverse_proxy = ReverseProxy::Ping;
        let (r, handle, _) = run(
            s,
            Bad {
                proxy_v1: v1,
                ..Bad::default()
            },
        );
        assert_eq!(r, Ok(()), "v1={v1}: {:#?}", handle.report().log);
        let p = handle.report().proxy.unwrap();
        assert_eq!(p.ctrl_version, Some(if v1 { 1 } else { 2 }));
        assert!(p.ping_ok);
    }
}

#[test]
fn missing_reverse_proxy_is_rejected_when_the_scenario_needs_it() {
    let (r, handle, _) = run(
        small("mac-revive"),
        Bad {
            skip_proxy: true,
            ..Bad::default()
        },
    );
    let err = r.unwrap_err();
    assert!(err.contains("reverse proxy on device port 1082"), "{err}");
    assert!(matches!(handle.outcome(), Outcome::Rejected { step, .. } if step == "StartRestore"));
}

#[test]
fn a_preflight_session_is_counted() {
    let (r, handle, _) = run(
        small("mac-erase"),
        Bad {
            preflight: true,
            ..Bad::default()
        },
    );
    assert_eq!(r, Ok(()), "{:#?}", handle.report().log);
    assert_eq!(handle.report().main_sessions, 2);
}

#[test]
fn a_preflight_reset_without_goodbye_does_not_end_the_restore() {
    let (r, handle, _) = run(
        small("mac-erase"),
        Bad {
            preflight_reset: true,
            ..Bad::default()
        },
    );
    let rep = handle.report();
    assert_eq!(r, Ok(()), "{:#?}", rep.log);
    assert_eq!(rep.main_sessions, 2);
    assert!(
        rep.log
            .iter()
            .any(|l| l.starts_with("session ended by the host before StartRestore")),
        "{:#?}",
        rep.log
    );
}

/// A larger image through the whole stack; memory stays bounded because both sides generate
/// and compare chunk by chunk. `MACSIM_IMAGE_MIB` raises the size (e.g. 4096 for a multi-GiB
/// run in release mode).
#[test]
fn larger_generated_image_streams_through_asr() {
    let mib: u64 = std::env::var("MACSIM_IMAGE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let mut s = scenario("mac-erase");
    s.image.size = mib << 20;
    s.steps
        .retain(|st| !matches!(st, Step::DataRequestMsg(r) if r.data_type == "RecoveryOSASRImage"));
    let t0 = std::time::Instant::now();
    let (r, handle, _) = run(s, Bad::default());
    assert_eq!(r, Ok(()), "{:#?}", handle.report().log);
    assert_eq!(handle.report().asr.unwrap().bytes, mib << 20);
    eprintln!(
        "{mib} MiB through usbmux + ASR in {:?} ({:.1} MB/s)",
        t0.elapsed(),
        (mib << 20) as f64 / t0.elapsed().as_secs_f64() / 1e6
    );
}

#[test]
fn rst_on_the_main_connection_fails_with_a_named_error() {
    let mut s = small("mac-revive");
    s.faults.rst_main_after_step = Some(4);
    let (r, handle, _) = run(s, Bad::default());
    let err = r.unwrap_err();
    assert!(
        err.contains("restored: simulated connection reset"),
        "{err}"
    );
    assert!(matches!(handle.outcome(), Outcome::Fault(ref w) if w.contains("after 4 steps")));
}

#[test]
fn plist_replies_on_a_data_port_are_validated_there() {
    let mut s = small("mac-revive");
    for st in s.steps.iter_mut() {
        if let Step::DataRequestMsg(r) | Step::AsyncDataRequestMsg(r) = st {
            if matches!(
                r.data_type.as_str(),
                "ReceiptManifest" | "URLAsset" | "PersonalizedBootObjectV3"
            ) {
                r.data_port = Some(49300);
            }
        }
    }
    let (r, handle, _) = run(s, Bad::default());
    assert_eq!(r, Ok(()), "{:#?}", handle.report().log);
    assert!(handle
        .report()
        .log
        .iter()
        .any(|l| l.contains("ReceiptManifest (port Some(49300))")));
}

#[test]
fn cpio_without_trailer_is_rejected() {
    expect_rejected(
        Bad {
            cpio_no_trailer: true,
            ..Bad::default()
        },
        "BootabilityBundle",
        "without TRAILER!!!",
    );
}

#[test]
fn every_other_message_type_and_optional_data_types_play_through() {
    let mut s = small("mac-revive");
    let req = |dt: &str| {
        Step::DataRequestMsg(DataRequest {
            data_type: dt.into(),
            arguments: Default::default(),
            data_port: None,
            expect_variant: None,
            expect_host_abort: false,
            expect_ticket: None,
            expect_firmware: None,
        })
    };
    let extra = vec![
        Step::RestoreAttestation,
        Step::RestoredCrash {
            backtrace: vec!["0 restored".into(), "1 libsystem".into()],
        },
        Step::AsyncWait,
        Step::CheckpointMsg {
            id: 0x60E,
            name: "update_NAND_firmware".into(),
            result: 0,
            complete: true,
            error: None,
            warning: Some("simulated warning".into()),
        },
        req("RootTicket"),
        req("HostSystemTime"),
    ];
    for (i, st) in extra.into_iter().enumerate() {
        s.steps.insert(1 + i, st);
    }
    let (r, handle, host) = run(s, Bad::default());
    assert_eq!(r, Ok(()), "{:#?}", handle.report().log);
    let served = handle.report().served;
    for dt in ["RestoreAttestation", "RootTicket", "HostSystemTime"] {
        assert!(served.iter().any(|s| s == dt), "{dt}: {served:?}");
    }
    assert!(host.log.iter().any(|l| l.starts_with("RestoredCrash")));
}
