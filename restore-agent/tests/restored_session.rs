//! The restored client against a scripted restore-mode Mac over in-memory pipes: every
//! DataType handler's reply shape, DataPort side connections, async requests, events, the
//! final status, and the failure paths (unknown DataType, device errors, wrong Mac).

mod restored_support;

use std::sync::Arc;
use std::time::Duration;

use plist::{Dictionary, Value};
use restore_agent::asr::AsrConfig;
use restore_agent::restored::options::{RestoreBehavior, StartRestoreParams};
use restore_agent::restored::{RestoreConfig, RestoreEvent, RestoredClient, RestoredError};
use restored_support::*;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

fn config() -> RestoreConfig {
    RestoreConfig {
        expected_ecid: Some(ECID),
        asr: AsrConfig {
            retry_delay: Duration::from_millis(1),
            command_timeout: Duration::from_secs(5),
            ..AsrConfig::default()
        },
        connect_attempts: 3,
        connect_retry_delay: Duration::from_millis(1),
        reverse_proxy: false,
        ..RestoreConfig::default()
    }
}

fn params() -> StartRestoreParams {
    StartRestoreParams {
        behavior: RestoreBehavior::Erase,
        macos_variant: "macOS Customer".into(),
        minimum_system_partition: Some(40_000),
        system_partition_padding: None,
        restore_protocol_version: 0,
        uuid: "12345678-1234-4234-8234-123456789ABC".into(),
    }
}

async fn run_host(
    ctx: Arc<MemContext>,
    conn: Arc<PipeConnector>,
) -> Result<restore_agent::restored::RestoreOutcome, RestoredError> {
    let client = RestoredClient::connect(ctx, conn, config()).await?;
    client.restore(params()).await
}

fn data(d: &Dictionary, k: &str) -> Vec<u8> {
    d.get(k)
        .and_then(Value::as_data)
        .unwrap_or_else(|| panic!("{k} missing in {d:?}"))
        .to_vec()
}

fn asr_cmd(body: &str) -> Vec<u8> {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n<plist version=\"1.0\">\n<dict>{body}</dict>\n</plist>\n"
    )
    .into_bytes()
}

/// Reads one unframed XML plist (the host's packet info).
async fn read_xml(s: &mut DuplexStream) -> Dictionary {
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while !buf.ends_with(b"</plist>\n") {
        s.read_exact(&mut b).await.unwrap();
        buf.push(b[0]);
    }
    Value::from_reader_xml(&buf[..])
        .unwrap()
        .into_dictionary()
        .unwrap()
}

/// The device half of an ASR session with checksum chunks and one OOB read.
async fn asr_device(mut s: DuplexStream, len: u64) {
    s.write_all(&asr_cmd(
        "<key>Command</key><string>Initiate</string><key>Checksum Chunks</key><true/>",
    ))
    .await
    .unwrap();
    let info = read_xml(&mut s).await;
    let payload = info.get("Payload").and_then(Value::as_dictionary).unwrap();
    assert_eq!(
        payload.get("Size").and_then(Value::as_unsigned_integer),
        Some(len)
    );
    s.write_all(&asr_cmd(
        "<key>Command</key><string>OOBData</string><key>OOB Offset</key><integer>1000</integer><key>OOB Length</key><integer>300</integer>",
    ))
    .await
    .unwrap();
    let mut oob = vec![0u8; 300];
    s.read_exact(&mut oob).await.unwrap();
    assert!(oob
        .iter()
        .enumerate()
        .all(|(i, b)| *b == gen_byte(1000 + i as u64)));
    s.write_all(&asr_cmd("<key>Command</key><string>Payload</string>"))
        .await
        .unwrap();
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(131_072) as usize;
        let mut chunk = vec![0u8; n];
        s.read_exact(&mut chunk).await.unwrap();
        let mut sum = [0u8; 20];
        s.read_exact(&mut sum).await.unwrap();
        assert_eq!(
            sum.as_slice(),
            Sha1::digest(&chunk).as_slice(),
            "chunk at {off}"
        );
        assert!(chunk
            .iter()
            .enumerate()
            .all(|(i, b)| *b == gen_byte(off + i as u64)));
        off += n as u64;
    }
}

#[tokio::test]
async fn full_session_serves_every_data_type() {
    let ctx = Arc::new(MemContext::new());
    let (conn, mut dev) = pair();
    let host = tokio::spawn(run_host(ctx.clone(), conn));

    let start = dev.handshake(ECID).await;
    assert_eq!(
        start
            .get("RestoreProtocolVersion")
            .and_then(Value::as_unsigned_integer),
        Some(15)
    );
    let opts = start
        .get("RestoreOptions")
        .and_then(Value::as_dictionary)
        .unwrap();
    assert_eq!(
        opts.get("AuthInstallRestoreBehavior")
            .and_then(Value::as_string),
        Some("Erase")
    );
    assert_eq!(
        opts.get("UUID").and_then(Value::as_string),
        Some("12345678-1234-4234-8234-123456789ABC")
    );
    assert_eq!(
        opts.get("SystemPartitionSize")
            .and_then(Value::as_unsigned_integer),
        Some(40_000)
    );
    let dts = opts
        .get("SupportedDataTypes")
        .and_then(Value::as_dictionary)
        .unwrap();
    assert_eq!(dts.get("BootabilityBundleV2"), Some(&Value::Boolean(false)));

    // Main-connection replies.
    dev.request(
        "BuildIdentityDict",
        None,
        dict(vec![("IsRecoveryOS", true.into())]),
        false,
    )
    .await;
    let r = dev.recv().await.unwrap();
    let id = r
        .get("BuildIdentityDict")
        .and_then(Value::as_dictionary)
        .unwrap();
    assert_eq!(
        id.get("Info")
            .and_then(Value::as_dictionary)
            .unwrap()
            .get("Variant")
            .and_then(Value::as_string),
        Some("macOS Customer")
    );
    assert_eq!(r.get("Variant").and_then(Value::as_string), Some("Erase"));

    dev.request("HostSystemTime", Some(40_100), Dictionary::new(), false)
        .await;
    let r = dev.recv().await.unwrap();
    assert!(
        r.get("SetHostTimeOnDevice")
            .and_then(Value::as_real)
            .unwrap()
            > 1.6e9
    );

    dev.request("RecoveryOSFileAssetImage", None, Dictionary::new(), false)
        .await;
    assert_eq!(
        dev.recv().await.unwrap(),
        dict(vec![("RecoveryOSNoAssetFound", true.into())])
    );

    dev.send(dict(vec![("MsgType", "RestoreAttestation".into())]))
        .await;
    assert_eq!(
        dev.recv().await.unwrap(),
        dict(vec![("RestoreShouldAttest", false.into())])
    );

    // DataPort replies: one fresh connection per request.
    let mut port = 50_000u16;
    let mut on_port = |dev: &mut Device| {
        port += 1;
        let _ = dev;
        port
    };

    let p = on_port(&mut dev);
    dev.request(
        "RecoveryOSRootTicketData",
        Some(p),
        Dictionary::new(),
        false,
    )
    .await;
    let mut s = dev.accept(p).await;
    assert_eq!(
        data(&recv_on(&mut s).await.unwrap(), "RootTicketData"),
        b"ROS-TICKET"
    );
    assert!(
        recv_on(&mut s).await.is_none(),
        "the side connection closes after the reply"
    );

    let p = on_port(&mut dev);
    dev.request("RootTicket", Some(p), Dictionary::new(), false)
        .await;
    let mut s = dev.accept(p).await;
    assert_eq!(
        data(&recv_on(&mut s).await.unwrap(), "RootTicketData"),
        b"APTICKET"
    );

    let p = on_port(&mut dev);
    dev.request(
        "RecoveryOSLocalPolicy",
        Some(p),
        dict(vec![
            ("Ap,NextStageIM4MHash", Value::Data(vec![1, 1])),
            ("Ap,RecoveryOSPolicyNonceHash", Value::Data(vec![2])),
            ("Ap,VolumeUUID", Value::Data(vec![3, 3, 3])),
        ]),
        false,
    )
    .await;
    let mut s = dev.accept(p).await;
    assert_eq!(
        data(&recv_on(&mut s).await.unwrap(), "Ap,LocalPolicy"),
        b"LPOL\x01\x01\x02\x03\x03\x03"
    );

    // Boot objects: FileData chunks on the DataPort.
    let p = on_port(&mut dev);
    dev.request(
        "PersonalizedBootObjectV3",
        Some(p),
        dict(vec![
            ("ImageName", "iBoot".into()),
            ("IsRecoveryOS", true.into()),
        ]),
        false,
    )
    .await;
    let mut s = dev.accept(p).await;
    let (bytes, frames) = read_file_data(&mut s).await;
    assert_eq!(bytes, img4("iBoot", true));
    assert_eq!(frames, 2, "9 KiB+ goes out as two FileData frames");

    let p = on_port(&mut dev);
    dev.request(
        "PersonalizedBootObjectV3",
        Some(p),
        dict(vec![
            ("ImageName", "__GlobalManifest__".into()),
            ("IsRecoveryOS", false.into()),
        ]),
        false,
    )
    .await;
    let mut s = dev.accept(p).await;
    assert_eq!(read_file_data(&mut s).await.0, b"GLOBAL-MANIFEST");

    let p = on_port(&mut dev);
    dev.request(
        "SourceBootObjectV4",
        Some(p),
        dict(vec![
            ("ImageName", "KernelCache".into()),
            ("IsRecoveryOS", false.into()),
        ]),
        false,
    )
    .await;
    let mut s = dev.accept(p).await;
    assert_eq!(read_file_data(&mut s).await.0, vec![0x4B; 20_000]);

    // Without a DataPort, FileData goes on the main connection.
    dev.request(
        "SourceBootObjectV5",
        None,
        dict(vec![("ImageName", "__SystemVersion__".into())]),
        false,
    )
    .await;
    let (bytes, _) = read_file_data(dev.main.as_mut().unwrap()).await;
    assert_eq!(bytes, b"<system-version/>");

    for (dt, key, comp) in [
        ("KernelCache", "KernelCacheFile", "KernelCache"),
        ("DeviceTree", "DeviceTreeFile", "DeviceTree"),
        (
            "SystemImageRootHash",
            "SystemImageRootHashFile",
            "SystemVolume",
        ),
        (
            "SystemImageCanonicalMetadata",
            "SystemImageCanonicalMetadataFile",
            "Ap,SystemVolumeCanonicalMetadata",
        ),
    ] {
        let p = on_port(&mut dev);
        dev.request(dt, Some(p), Dictionary::new(), false).await;
        let mut s = dev.accept(p).await;
        assert_eq!(
            data(&recv_on(&mut s).await.unwrap(), key),
            img4(comp, false),
            "{dt}"
        );
    }

    let p = on_port(&mut dev);
    dev.request("NORData", Some(p), Dictionary::new(), false)
        .await;
    let mut s = dev.accept(p).await;
    let nor = recv_on(&mut s).await.unwrap();
    assert_eq!(data(&nor, "LlbImageData"), img4("LLB", false));
    let list = nor.get("NorImageData").and_then(Value::as_array).unwrap();
    let names: Vec<String> = list
        .iter()
        .map(|v| {
            String::from_utf8_lossy(v.as_data().unwrap())
                .split(':')
                .nth(1)
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(names, ["iBoot", "AppleLogo", "DeviceTree"]);
    assert_eq!(data(&nor, "RestoreSEPImageData"), img4("RestoreSEP", false));
    assert_eq!(data(&nor, "SEPImageData"), img4("SEP", false));
    assert!(nor.get("SEPPatchImageData").is_none());

    let p = on_port(&mut dev);
    dev.request(
        "NORData",
        Some(p),
        dict(vec![("FlashVersion1", true.into())]),
        false,
    )
    .await;
    let mut s = dev.accept(p).await;
    let nor = recv_on(&mut s).await.unwrap();
    let d = nor
        .get("NorImageData")
        .and_then(Value::as_dictionary)
        .unwrap();
    let mut keys: Vec<&str> = d.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["AppleLogo", "DeviceTree", "iBoot"]);
    assert_eq!(
        d.get("iBoot").and_then(Value::as_data),
        Some(img4("iBoot", false).as_slice())
    );
    assert_eq!(d.len(), 3);

    for dt in [
        "FirmwareUpdaterPreflight",
        "FDRTrustData",
        "DeviceRestoreInfoPreflight",
    ] {
        let p = on_port(&mut dev);
        dev.request(dt, Some(p), Dictionary::new(), false).await;
        let mut s = dev.accept(p).await;
        assert_eq!(recv_on(&mut s).await.unwrap(), Dictionary::new(), "{dt}");
    }

    let p = on_port(&mut dev);
    let fw_args = dict(vec![("MessageArgType", "Ace3".into())]);
    dev.request("FirmwareUpdaterData", Some(p), fw_args.clone(), false)
        .await;
    let mut s = dev.accept(p).await;
    assert_eq!(
        recv_on(&mut s).await.unwrap(),
        dict(vec![(
            "FirmwareResponseData",
            Value::Dictionary(dict(vec![("Echo", Value::Dictionary(fw_args))]))
        )])
    );

    let p = on_port(&mut dev);
    dev.request("ReceiptManifest", Some(p), Dictionary::new(), false)
        .await;
    let mut s = dev.accept(p).await;
    let r = recv_on(&mut s).await.unwrap();
    assert_eq!(
        r.get("ReceiptManifest"),
        identity("Customer Erase Install (IPSW)").get("Manifest")
    );

    let p = on_port(&mut dev);
    dev.request(
        "FUDData",
        Some(p),
        dict(vec![("FUDImageList", true.into())]),
        false,
    )
    .await;
    let mut s = dev.accept(p).await;
    assert_eq!(
        recv_on(&mut s).await.unwrap(),
        dict(vec![(
            "FUDImageList",
            Value::Array(vec!["Ap,AudioFUD".into(), "Ap,OtherFUD".into()])
        )])
    );

    let p = on_port(&mut dev);
    dev.request(
        "FUDData",
        Some(p),
        dict(vec![("ImageName", "Ap,AudioFUD".into())]),
        false,
    )
    .await;
    let mut s = dev.accept(p).await;
    let r = recv_on(&mut s).await.unwrap();
    assert_eq!(data(&r, "FUDImageData"), img4("Ap,AudioFUD", false));
    assert_eq!(
        r.get("ImageName").and_then(Value::as_string),
        Some("Ap,AudioFUD")
    );

    let p = on_port(&mut dev);
    dev.request(
        "PersonalizedData",
        Some(p),
        dict(vec![
            ("ImageType", "IsCustomThing".into()),
            ("ImageList", true.into()),
        ]),
        false,
    )
    .await;
    let mut s = dev.accept(p).await;
    assert_eq!(
        recv_on(&mut s).await.unwrap(),
        dict(vec![(
            "ImageList",
            Value::Array(vec!["Ap,OtherFUD".into()])
        )])
    );

    let p = on_port(&mut dev);
    dev.request("EANData", Some(p), Dictionary::new(), false)
        .await;
    let mut s = dev.accept(p).await;
    let r = recv_on(&mut s).await.unwrap();
    let all = r.get("EANData").and_then(Value::as_dictionary).unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(
        all.get("Ap,AudioFUD").and_then(Value::as_data),
        Some(img4("Ap,AudioFUD", false).as_slice())
    );

    // BootabilityBundle: a raw cpio stream.
    for dt in ["BootabilityBundle", "BootabilityBundleV2"] {
        let p = on_port(&mut dev);
        dev.request(dt, Some(p), Dictionary::new(), false).await;
        let mut s = dev.accept(p).await;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.unwrap();
        let mut names = Vec::new();
        let mut at = 0;
        loop {
            let h = std::str::from_utf8(&raw[at..at + 76]).unwrap();
            assert_eq!(&h[..6], "070707");
            let namesize = usize::from_str_radix(&h[59..65], 8).unwrap();
            let filesize = usize::from_str_radix(&h[65..76], 8).unwrap();
            let name = std::str::from_utf8(&raw[at + 76..at + 76 + namesize - 1])
                .unwrap()
                .to_owned();
            at += 76 + namesize + filesize;
            if name == "TRAILER!!!" {
                break;
            }
            names.push(name);
        }
        assert_eq!(at, raw.len());
        assert_eq!(names, ["a.txt", "sub/b.bin", "Bootability.trustcache"]);
    }

    // An async URLAsset: the loop keeps reading the main connection while it runs.
    let p = on_port(&mut dev);
    dev.request(
        "URLAsset",
        Some(p),
        dict(vec![
            ("RequestMethod", "GET".into()),
            ("RequestURL", "https://example.invalid/x".into()),
        ]),
        true,
    )
    .await;
    dev.send(dict(vec![
        ("MsgType", "ProgressMsg".into()),
        ("Operation", Value::Integer(13.into())),
        ("Progress", Value::Integer(42.into())),
    ]))
    .await;
    dev.send(dict(vec![
        ("MsgType", "CheckpointMsg".into()),
        ("CHECKPOINT_ID", Value::Integer(1234.into())),
        ("CHECKPOINT_NAME", "update_aht".into()),
        ("CHECKPOINT_RESULT", Value::Integer(1.into())),
        ("CHECKPOINT_COMPLETE", true.into()),
        ("CHECKPOINT_ERROR", "ramrod firmware update failed".into()),
    ]))
    .await;
    let mut s = dev.accept(p).await;
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).await.unwrap();
    assert!(
        body.starts_with(b"bplist00"),
        "URLAsset replies are binary plists"
    );
    let r = Value::from_reader(std::io::Cursor::new(body))
        .unwrap()
        .into_dictionary()
        .unwrap();
    assert_eq!(data(&r, "ResponseBody"), b"GET https://example.invalid/x");
    assert_eq!(
        r.get("ResponseStatus").and_then(Value::as_unsigned_integer),
        Some(200)
    );
    assert_eq!(r.get("ResponseBodyDone"), Some(&Value::Boolean(true)));

    // The system image over ASR on its DataPort.
    dev.request("SystemImageData", Some(12_346), Dictionary::new(), false)
        .await;
    let s = dev.accept(12_346).await;
    asr_device(s, ctx.image_len).await;

    dev.send(dict(vec![
        ("MsgType", "RestoredCrash".into()),
        ("RestoredBacktrace", "frame0".into()),
    ]))
    .await;
    dev.send(dict(vec![("MsgType", "SomethingNew".into())]))
        .await;
    dev.send(dict(vec![
        ("MsgType", "StatusMsg".into()),
        ("Status", Value::Integer(0.into())),
    ]))
    .await;
    assert_eq!(
        dev.recv().await.unwrap(),
        dict(vec![("MsgType", "ReceivedFinalStatusMsg".into())])
    );

    let outcome = tokio::time::timeout(Duration::from_secs(10), host)
        .await
        .unwrap()
        .unwrap()
        .expect("restore succeeds");
    assert_eq!(outcome.restore_protocol_version, 15);
    assert!(outcome.data_served.contains(&"URLAsset".to_string()));
    assert_eq!(outcome.asr_sessions.len(), 1);
    assert_eq!(outcome.asr_sessions[0].oob_reads, 1);
    assert!(outcome.asr_sessions[0].checksum_chunks);

    let events = ctx.events();
    assert!(events.iter().any(|e| matches!(
        e,
        RestoreEvent::Progress {
            operation: 13,
            name: "restoring image",
            percent: Some(42)
        }
    )));
    assert!(events.iter().any(|e| matches!(e, RestoreEvent::Checkpoint { checkpoint, hint: Some(_) } if checkpoint.id == 1234)));
    assert!(events
        .iter()
        .any(|e| matches!(e, RestoreEvent::Crash { backtrace } if backtrace == &["frame0"])));
    assert!(events
        .iter()
        .any(|e| matches!(e, RestoreEvent::UnknownMessage(m) if m == "SomethingNew")));
    assert!(events
        .iter()
        .any(|e| matches!(e, RestoreEvent::SavedDebugInfo(_))));
    assert!(events
        .iter()
        .any(|e| matches!(e, RestoreEvent::ImageProgress { sent, total } if sent == total)));
    assert!(events
        .iter()
        .any(|e| matches!(e, RestoreEvent::FinalStatus { status: 0, .. })));
}

async fn until_request(dev: &mut Device, data_type: &str) {
    dev.handshake(ECID).await;
    dev.request(data_type, None, Dictionary::new(), false).await;
}

#[tokio::test]
async fn unknown_data_type_fails_at_once_naming_it() {
    let ctx = Arc::new(MemContext::new());
    let (conn, mut dev) = pair();
    let host = tokio::spawn(run_host(ctx, conn));
    until_request(&mut dev, "QuantumFluxData").await;
    let err = tokio::time::timeout(Duration::from_secs(5), host)
        .await
        .expect("no hang")
        .unwrap()
        .unwrap_err();
    assert!(matches!(&err, RestoredError::UnknownDataType(t) if t == "QuantumFluxData"));
    assert!(err.to_string().contains("\"QuantumFluxData\""), "{err}");
}

#[tokio::test]
async fn async_request_failure_fails_the_restore() {
    let ctx = Arc::new(MemContext::new());
    let (conn, mut dev) = pair();
    let host = tokio::spawn(run_host(ctx, conn));
    dev.handshake(ECID).await;
    dev.request("MysteryAsync", Some(5000), Dictionary::new(), true)
        .await;
    let err = tokio::time::timeout(Duration::from_secs(5), host)
        .await
        .expect("no hang")
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("MysteryAsync"), "{err}");
}

#[tokio::test]
async fn device_error_status_is_explained() {
    let ctx = Arc::new(MemContext::new());
    let (conn, mut dev) = pair();
    let host = tokio::spawn(run_host(ctx, conn));
    dev.handshake(ECID).await;
    dev.send(dict(vec![
        ("MsgType", "StatusMsg".into()),
        ("Status", Value::Integer(6.into())),
        ("AMRError", Value::Integer(3194.into())),
        ("Log", "disk0 went away".into()),
    ]))
    .await;
    let err = host.await.unwrap().unwrap_err();
    match &err {
        RestoredError::DeviceFailed {
            status: 6,
            amr_error: Some(3194),
            log: Some(l),
            ..
        } => {
            assert_eq!(l, "disk0 went away")
        }
        other => panic!("{other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("disk failure")
            && text.contains("AMRError 3194")
            && text.contains("disk0 went away"),
        "{text}"
    );
}

#[tokio::test]
async fn host_incompatibility_names_the_missing_types() {
    let ctx = Arc::new(MemContext::new());
    let (conn, mut dev) = pair();
    let host = tokio::spawn(run_host(ctx, conn));
    dev.handshake(ECID).await;
    // Shaped after issue #786 (macOS 27 beta against a host without BootabilityBundleV2).
    dev.send(dict(vec![
        ("MsgType", "CheckpointMsg".into()),
        ("CHECKPOINT_ID", Value::Integer(0x655.into())),
        ("CHECKPOINT_NAME", "is_host_compatible".into()),
        ("CHECKPOINT_RESULT", Value::Integer(10.into())),
        ("CHECKPOINT_COMPLETE", true.into()),
        (
            "CHECKPOINT_ERROR",
            "[0]D(This host version is unsupported. You may need to update your host tools.)"
                .into(),
        ),
    ]))
    .await;
    dev.send(dict(vec![
        ("MsgType", "StatusMsg".into()),
        ("Status", Value::Integer(10.into())),
        (
            "Log",
            "host/device compatibility check found that a message is missing or is not supported (optional): SourceBootObjectV5\nhost/device compatibility check found that a message is missing or is not supported (required): BootabilityBundleV2\n".into(),
        ),
    ]))
    .await;
    let err = host.await.unwrap().unwrap_err();
    match &err {
        RestoredError::DeviceFailed {
            status: 10,
            missing_required,
            ..
        } => {
            assert_eq!(missing_required, &["BootabilityBundleV2"])
        }
        other => panic!("{other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("restored requires: BootabilityBundleV2")
            && text.contains("is_host_compatible"),
        "{text}"
    );
}

#[tokio::test]
async fn verification_error_status() {
    let ctx = Arc::new(MemContext::new());
    let (conn, mut dev) = pair();
    let host = tokio::spawn(run_host(ctx, conn));
    dev.handshake(ECID).await;
    dev.send(dict(vec![
        ("MsgType", "StatusMsg".into()),
        ("Status", Value::Integer(u64::MAX.into())),
    ]))
    .await;
    let err = host.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("verification error"), "{err}");
}

#[tokio::test]
async fn wrong_mac_and_wrong_mode_are_refused() {
    let ctx = Arc::new(MemContext::new());
    let (conn, mut dev) = pair();
    let host = tokio::spawn(run_host(ctx.clone(), conn));
    dev.accept_main().await;
    dev.recv().await.unwrap();
    dev.send(dict(vec![("Type", "com.apple.mobile.lockdown".into())]))
        .await;
    let err = host.await.unwrap().unwrap_err();
    assert!(
        matches!(err, RestoredError::NotRestoreMode { ref found } if found == "com.apple.mobile.lockdown")
    );

    let (conn, mut dev) = pair();
    let host = tokio::spawn(run_host(ctx, conn));
    dev.accept_main().await;
    dev.recv().await.unwrap();
    dev.send(dict(vec![
        ("Type", "com.apple.mobile.restored".into()),
        ("RestoreProtocolVersion", Value::Integer(15.into())),
    ]))
    .await;
    dev.recv().await.unwrap();
    dev.send(dict(vec![(
        "HardwareInfo",
        Value::Dictionary(dict(vec![("UniqueChipID", Value::Integer(42.into()))])),
    )]))
    .await;
    let err = host.await.unwrap().unwrap_err();
    assert!(matches!(
        err,
        RestoredError::WrongMac {
            expected: ECID,
            found: 42
        }
    ));
    assert!(err.to_string().contains("0x2a"), "{err}");
}

#[tokio::test]
async fn connection_lost_and_context_failure() {
    let ctx = Arc::new(MemContext::new());
    let (conn, mut dev) = pair();
    let host = tokio::spawn(run_host(ctx, conn));
    dev.handshake(ECID).await;
    dev.main = None;
    let err = host.await.unwrap().unwrap_err();
    assert!(matches!(err, RestoredError::ConnectionLost), "{err:?}");

    let mut c = MemContext::new();
    c.fail_personalize = Some("KernelCache".into());
    let (conn, mut dev) = pair();
    let host = tokio::spawn(run_host(Arc::new(c), conn));
    until_request(&mut dev, "KernelCache").await;
    let err = host.await.unwrap().unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("KernelCache") && text.contains("TSS refused"),
        "{text}"
    );
}

#[tokio::test]
async fn silent_restored_times_out() {
    let (conn, mut dev) = pair();
    let mut c = config();
    c.query_timeout = Duration::from_millis(30);
    let host = tokio::spawn(async move {
        RestoredClient::connect(Arc::new(MemContext::new()), conn, c)
            .await?
            .restore(params())
            .await
    });
    dev.accept_main().await;
    let err = host.await.unwrap().unwrap_err();
    assert!(matches!(err, RestoredError::NoAnswer(_)), "{err:?}");
    drop(dev);
}

#[tokio::test]
async fn refused_data_port_is_a_named_error() {
    let ctx = Arc::new(MemContext::new());
    let (conn, mut dev) = pair();
    conn.refuse.lock().unwrap().push(7000);
    let host = tokio::spawn(run_host(ctx, conn));
    dev.handshake(ECID).await;
    dev.request("RootTicket", Some(7000), Dictionary::new(), false)
        .await;
    let err = tokio::time::timeout(Duration::from_secs(5), host)
        .await
        .expect("no hang")
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(err, RestoredError::Connect { port: 7000, .. }),
        "{err:?}"
    );
}
