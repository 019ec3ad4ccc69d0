//! The fuzzing entry points, shared by the cargo-fuzz targets (`fuzz_targets/*.rs`) and by the
//! stable-toolchain smoke test (`restore-agent/tests/fuzz_smoke.rs`, which includes this file),
//! so both exercise exactly the same code and invariants.
//!
//! Each function takes arbitrary bytes, must never panic on its own, and asserts the parsers'
//! invariants: what parses re-emits and re-parses to the same value, what is reported lies
//! inside the input, and what is derived from it keeps its documented properties.

use std::cmp::Ordering;
use std::io::Read;
use std::time::{Duration, Instant};

use restore_agent::asr::{self, AsrError, CommandParser, MAX_COMMAND_LEN};
use restore_agent::bootchain::plan::{self, Step};
use restore_agent::catalog::{self, FirmwareEntry, MesuCatalog};
use restore_agent::identity::{serial, AppleMode, DeviceIdentity};
use restore_agent::img4::{self, der, im4m, im4p};
use restore_agent::ipsw::zip::{
    find_eocd, parse_central_directory, parse_local_header, parse_zip64_eocd, parse_zip64_locator,
};
use restore_agent::ipsw::{Method, RandomAccess, ZipArchive, ZipError};
use restore_agent::manifest::{BuildIdentity, BuildManifest, RestoreBehavior};
use restore_agent::restored::framing::{self, Decoder, Encoding, FramingError};
use restore_agent::tss;
use restore_agent::usb::descriptor::{
    emit_language_ids, emit_string, parse_language_ids, parse_string, ConfigDescriptor,
    DescriptorError, DeviceDescriptor,
};
use restore_agent::usbmux::wire::{
    ControlPayload, HeaderVersion, MuxHeader, MuxPacket, Protocol, TcpHeader, VersionPayload,
    MUX_MAGIC, VERSION_PAYLOAD_LEN,
};
use restore_agent::usbmux::{
    ConnId, Event, Mux, MuxConfig, Phase, MAX_TX_PACKET, RX_TRANSFER_SIZE,
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

// ----- IPSW ZIP reader ------------------------------------------------------------------------

/// Largest entry the ZIP target decompresses: enough for every seed, small enough that a
/// deflate bomb costs nothing.
pub const ZIP_READ_LIMIT: u64 = 1 << 20;

/// The ZIP record parsers on the raw bytes, then `ZipArchive` over them as an in-memory IPSW,
/// reading every entry three ways (whole, streamed in small reads, stored random access).
pub fn zip_central_directory(data: &[u8]) {
    if let Some(eocd) = find_eocd(data) {
        assert!(eocd.position + 22 <= data.len(), "EOCD past the input");
    }
    let _ = parse_zip64_locator(data);
    let _ = parse_zip64_eocd(data);
    if let Ok(entries) = parse_central_directory(data) {
        // Each entry takes at least its 46-byte fixed header.
        assert!(entries.len() * 46 <= data.len());
    }
    if let Some(variable) = parse_local_header(data) {
        assert!(data.len() >= 30 && variable <= 2 * u64::from(u16::MAX));
    }

    let Ok(archive) = ZipArchive::open(data.to_vec()) else {
        return;
    };
    let len = data.len() as u64;
    for entry in archive.entries() {
        let plain_name = !entry.name.starts_with('/') && !entry.name.starts_with("./");
        if plain_name {
            // Lookup by name finds the first entry of that name, as `unzip` does.
            let first = archive.entries().iter().find(|e| e.name == entry.name);
            assert!(std::ptr::eq(
                archive.entry(&entry.name).unwrap(),
                first.unwrap()
            ));
        }
        let start = archive.data_offset(entry).ok();
        if let Some(start) = start {
            assert!(start >= entry.local_header_offset + 30);
            assert!(
                start + entry.compressed_size <= len,
                "entry data past the input"
            );
        }

        match archive.read_to_vec(entry, ZIP_READ_LIMIT) {
            Ok(bytes) => {
                assert_eq!(bytes.len() as u64, entry.uncompressed_size);
                assert_eq!(crc32fast::hash(&bytes), entry.crc32);
                assert!(!entry.is_encrypted());
                let start = start.expect("a read entry has a data offset") as usize;
                match entry.method {
                    Method::Stored => assert_eq!(&bytes[..], &data[start..start + bytes.len()]),
                    Method::Deflated => {}
                    Method::Other(code) => panic!("method {code} was read"),
                }
            }
            Err(ZipError::TooLarge { size, limit, .. }) => {
                assert!(size > limit && limit == ZIP_READ_LIMIT)
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }

        if entry.uncompressed_size <= ZIP_READ_LIMIT {
            if let Ok(mut reader) = archive.reader(entry) {
                let mut buf = [0u8; 509];
                let mut total = 0u64;
                loop {
                    match reader.read(&mut buf) {
                        Ok(0) => {
                            assert_eq!(total, entry.uncompressed_size);
                            break;
                        }
                        Ok(n) => {
                            total += n as u64;
                            assert!(total <= entry.uncompressed_size, "read past the size");
                            assert_eq!(reader.position(), total);
                        }
                        Err(e) => {
                            assert!(!ZipError::from_io(e).to_string().is_empty());
                            break;
                        }
                    }
                }
            }
        }

        if let Ok(stored) = archive.stored(entry) {
            assert_eq!(stored.len(), entry.uncompressed_size);
            let end = stored.data_offset() + stored.len();
            assert!(end <= len, "stored entry past the input");
            let mut one = [0u8; 1];
            if stored.len() > 0 {
                stored
                    .read_exact_at(stored.len() - 1, &mut one)
                    .expect("the last byte of a stored entry reads");
                assert_eq!(one[0], data[end as usize - 1]);
            }
            assert!(stored.read_exact_at(stored.len(), &mut one).is_err());
            assert!(stored.read_exact_at(u64::MAX, &mut one).is_err());
        }
    }
}

// ----- firmware catalogs ----------------------------------------------------------------------

/// The mesu plist parser with `builds_for` on every product it lists, and the ipsw.me JSON
/// parser for the device the answer names and for one it does not.
pub fn catalog(data: &[u8]) {
    if let Ok(catalog) = MesuCatalog::parse(data) {
        let products: Vec<String> = catalog.product_types().map(str::to_owned).collect();
        for product in &products {
            match catalog.builds_for(product) {
                Ok(entries) => check_firmware_entries(&entries),
                Err(e) => assert!(!e.to_string().is_empty()),
            }
        }
        if !products.iter().any(|p| p == "Mac99,9") {
            assert!(catalog.builds_for("Mac99,9").is_err());
        }
    }

    let identifier = serde_json::from_slice::<serde_json::Value>(data)
        .ok()
        .and_then(|v| Some(v.get("identifier")?.as_str()?.to_owned()));
    if let Some(identifier) = &identifier {
        if let Ok(entries) = catalog::parse_ipsw_me_device(data, identifier) {
            check_firmware_entries(&entries);
        }
    }
    if let Ok(entries) = catalog::parse_ipsw_me_device(data, "Mac99,9") {
        assert_eq!(identifier.as_deref(), Some("Mac99,9"));
        check_firmware_entries(&entries);
    }
}

fn check_firmware_entries(entries: &[FirmwareEntry]) {
    assert!(!entries.is_empty(), "an empty list must be an error");
    for e in entries {
        assert!(e.url.starts_with("https://") || e.url.starts_with("http://"));
        assert!(!e.version.is_empty() && e.version.trim() == e.version);
        assert!(!e.build.is_empty() && e.build.trim() == e.build);
        if let Some(hex) = e.sha1_hex() {
            assert_eq!(hex.len(), 40);
            assert_eq!(catalog::parse_sha1(&hex), Ok(e.sha1.unwrap()));
        }
        if let Some(name) = e.file_name() {
            assert!(!name.is_empty() && !name.contains('/'));
        }
    }
    for pair in entries.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        let versions = catalog::compare_versions(&a.version, &b.version);
        assert_eq!(
            versions.reverse(),
            catalog::compare_versions(&b.version, &a.version)
        );
        let builds = catalog::compare_builds(&a.build, &b.build);
        assert_eq!(
            builds.reverse(),
            catalog::compare_builds(&b.build, &a.build)
        );
        assert_ne!(
            versions.then(builds),
            Ordering::Less,
            "not newest first: {a:?} before {b:?}"
        );
    }
}

// ----- build manifests and boot plans ---------------------------------------------------------

/// `BuildManifest::from_bytes`, identity selection for every board it lists (Update and
/// Erase), and the DFU / stage 1 / stage 2 plans of each selected identity.
pub fn manifest(data: &[u8]) {
    let Ok(manifest) = BuildManifest::from_bytes(data) else {
        return;
    };
    assert!(manifest.boards().len() <= manifest.identities.len());
    for (index, identity) in manifest.identities.iter().enumerate() {
        assert_eq!(identity.index, index);
    }
    let mut boards: Vec<&str> = Vec::new();
    for identity in &manifest.identities {
        if !boards.contains(&identity.info.device_class.as_str()) {
            boards.push(&identity.info.device_class);
        }
    }
    for board in boards {
        assert!(!manifest.identities_for_board(board).is_empty());
        for behavior in [RestoreBehavior::Update, RestoreBehavior::Erase] {
            match manifest.select_identity(board, behavior) {
                Ok(identity) => {
                    assert!(identity.is_for_board(board));
                    if let Some(b) = &identity.info.restore_behavior {
                        assert_eq!(b, behavior.as_str());
                    }
                    assert!(!identity.info.variant.contains("Research"));
                    plans(identity);
                }
                Err(e) => assert!(!e.to_string().is_empty()),
            }
            match manifest.select_boot_identity(board, behavior) {
                Ok(identity) => {
                    assert!(identity.is_for_board(board) && identity.is_bootable());
                    plans(identity);
                }
                Err(e) => assert!(!e.to_string().is_empty()),
            }
        }
        let _ = manifest.is_macos_restore(board);
    }
    for identity in &manifest.identities {
        let chip = identity.ap_chip_id.and_then(|c| u32::try_from(c).ok());
        let board = identity.ap_board_id.and_then(|b| u32::try_from(b).ok());
        if let (Some(chip), Some(board)) = (chip, board) {
            if !identity.info.device_class.is_empty() {
                let found = manifest
                    .board_for_chip(chip, board)
                    .expect("this identity has that chip and board");
                assert!(!manifest.identities_for_board(&found).is_empty());
            }
        }
    }
    for product in &manifest.supported_product_types {
        assert!(manifest.check_product(product).is_ok());
    }
}

fn plans(identity: &BuildIdentity) {
    let dfu = plan::dfu(identity);
    assert_eq!(dfu.is_ok(), identity.has("iBSS"));
    let stage1 = plan::stage1(identity, true);
    assert_eq!(
        stage1.is_ok(),
        identity.has("RestoreLogo") && identity.has("iBEC")
    );
    assert_eq!(plan::stage1(identity, false).is_ok(), stage1.is_ok());
    let stage2 = plan::stage2(identity);
    assert_eq!(
        stage2.is_ok(),
        ["RestoreRamDisk", "RestoreDeviceTree", "RestoreKernelCache"]
            .iter()
            .all(|c| identity.has(c))
    );
    assert_eq!(plan::recovery_ibec(identity).is_ok(), identity.has("iBEC"));
    if let Ok(steps) = &stage1 {
        // Every stage-1 firmware is uploaded, then announced with `firmware`.
        let firmware = identity.stage1_components().count();
        let announced = steps
            .windows(2)
            .filter(|w| {
                matches!(&w[0], Step::Upload { .. })
                    && w[1] == Step::Command("firmware".to_string())
            })
            .count();
        assert_eq!(announced, firmware);
    }
    let all: Vec<&[Step]> = [&dfu, &stage1, &stage2]
        .into_iter()
        .filter_map(|p| p.as_ref().ok().map(Vec::as_slice))
        .collect();
    for component in plan::components(&all) {
        assert!(
            component == plan::LOCAL_POLICY || identity.has(&component),
            "plan uploads {component}, which the identity lacks"
        );
    }
    for e in [dfu.err(), stage1.err(), stage2.err()]
        .into_iter()
        .flatten()
    {
        assert!(!e.to_string().is_empty());
    }
}

// ----- TSS responses --------------------------------------------------------------------------

/// `tss::parse_response`, then every data item of a successful answer read as an IM4M.
pub fn tss_response(data: &[u8]) {
    match tss::parse_response(data) {
        Ok(response) => {
            assert_eq!(response.message, "SUCCESS");
            if let Ok(ticket) = response.ap_img4_ticket() {
                if let Ok(m) = im4m::parse(ticket) {
                    assert!(!m.to_string().is_empty());
                }
            }
            for (key, value) in response.tickets.iter() {
                if let Some(component) = key.strip_suffix("-TBM") {
                    let _ = response.tbm(component);
                }
                if let Some(bytes) = value.as_data() {
                    assert_eq!(response.ticket(key).ok(), Some(bytes));
                    let _ = im4m::parse(bytes);
                }
            }
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            let _ = e.is_retryable();
        }
    }
}

// ----- firmware updaters (§4.9) ---------------------------------------------------------------

/// A build identity with one entry of every coprocessor family the updater builders read.
fn updater_identity() -> &'static plist::Dictionary {
    use plist::{Dictionary, Value};
    static ID: std::sync::OnceLock<Dictionary> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let rules = Value::Array(vec![Value::Dictionary(Dictionary::from_iter([
            (
                "Conditions".to_string(),
                Value::Dictionary(Dictionary::from_iter([(
                    "ApCurrentProductionMode".to_string(),
                    Value::Boolean(true),
                )])),
            ),
            (
                "Actions".to_string(),
                Value::Dictionary(Dictionary::from_iter([(
                    "EPRO".to_string(),
                    Value::Boolean(true),
                )])),
            ),
        ]))]);
        let entry = |path: &str, ruled: bool| {
            let mut info = Dictionary::from_iter([("Path".to_string(), Value::from(path))]);
            if ruled {
                info.insert("RestoreRequestRules".into(), rules.clone());
            }
            Value::Dictionary(Dictionary::from_iter([
                ("Digest".to_string(), Value::Data(vec![0xD1; 48])),
                ("Trusted".to_string(), Value::Boolean(true)),
                ("Info".to_string(), Value::Dictionary(info)),
            ]))
        };
        let mut manifest = Dictionary::new();
        for (name, ruled) in [
            ("Timer,RTKitOS,1", true),
            ("Timer,RestoreRTKitOS,1", true),
            ("Baobab,TCON", false),
            ("BMU,FirmwareMap", false),
            ("Rap,RTKitOS", true),
            ("Rap,RestoreRTKitOS", true),
            ("SE,UpdatePayload", false),
            ("SEP", false),
            ("Savage,B0-Prod-Patch", false),
            ("Yonkers,SysTopPatch0", false),
        ] {
            manifest.insert(name.into(), entry(&format!("Firmware/{name}.bin"), ruled));
        }
        Dictionary::from_iter([
            ("UniqueBuildID".to_string(), Value::Data(vec![0x0B; 20])),
            ("ApChipID".to_string(), Value::from("0x6020")),
            ("ApBoardID".to_string(), Value::from("0x26")),
            ("ApSecurityDomain".to_string(), Value::from("0x01")),
            ("Baobab,ChipID".to_string(), Value::from("0x855")),
            ("Timer,ChipID,1".to_string(), Value::from(26112u64)),
            ("Manifest".to_string(), Value::Dictionary(manifest)),
        ])
    })
}

/// `FirmwareUpdaterData` arguments from the device (any plist) through
/// `tss::UpdaterArgs::parse`, `tss::updater_request` and `tss::firmware_response` (with a
/// reply holding the ticket and the input as every firmware file); the input also goes
/// through `ftab::Ftab::parse`.
pub fn firmware_updater(data: &[u8]) {
    use restore_agent::ftab::Ftab;
    if let Ok(t) = Ftab::parse(data) {
        let bytes = t.to_bytes().expect("a parsed table fits in 4 GiB");
        assert_eq!(Ftab::parse(&bytes).as_ref(), Ok(&t));
    }
    let Ok(plist::Value::Dictionary(arguments)) =
        plist::Value::from_reader(std::io::Cursor::new(data))
    else {
        return;
    };
    let args = match tss::UpdaterArgs::parse(&arguments) {
        Ok(a) => a,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let uuid = tss::RequestUuid::parse("6B608AE8-F88E-0D75-62B0-1DB5A2323A7A").unwrap();
    match tss::updater_request(updater_identity(), &args, &uuid) {
        Ok(plan) => {
            assert_eq!(
                plan.request.get("@UUID").and_then(|v| v.as_string()),
                Some(uuid.as_str())
            );
            assert!(!plan.ticket.is_empty());
            let reply = tss::TssResponse {
                status: 0,
                message: "SUCCESS".into(),
                tickets: plist::Dictionary::from_iter([(
                    plan.ticket.clone(),
                    plist::Value::Data(vec![0x30, 0x00]),
                )]),
            };
            let files = plan
                .firmware
                .components()
                .into_iter()
                .map(|c| (c.to_string(), data.to_vec()))
                .collect();
            match tss::firmware_response(&plan, &reply, &files) {
                Ok(out) => assert!(out.contains_key(&plan.ticket)),
                Err(e) => assert!(e.to_string().contains(&plan.updater), "{e}"),
            }
        }
        Err(e) => assert!(e.to_string().contains(&args.name), "{e}"),
    }
}

// ----- IMG4 -----------------------------------------------------------------------------------

/// Components whose stitching the IMG4 target tries: with and without a restore 4CC rewrite.
const STITCH_COMPONENTS: &[&str] = &["iBSS", "RestoreKernelCache", "RestoreLogo", "Ap,DCP2"];

/// Every IMG4 parser over the input, and `stitch` round trips: the input as IM4P (with a
/// fixed ticket), as ticket (with the local-policy IM4P), as IM4R, and the parts of an input
/// IMG4 re-stitched.
pub fn img4(data: &[u8]) {
    if let Ok(el) = der::read(data) {
        assert_eq!(el.raw, &data[el.start..el.end()]);
        assert_eq!(el.content, &data[el.content_range.clone()]);
        let again = der::element(el.tag, el.content);
        let re = der::read(&again).expect("an emitted element reads back");
        assert_eq!(
            (re.tag, re.content, re.end()),
            (el.tag, el.content, again.len())
        );
        for child in el.children() {
            let Ok(child) = child else { break };
            assert!(child.start >= el.content_range.start && child.end() <= el.end());
            assert_eq!(child.raw, &data[child.start..child.end()]);
        }
    }

    let p = im4p::parse(data);
    if let Ok(p) = &p {
        assert!(p.element.start == 0 && p.element.end <= data.len());
        assert!(p.payload.start >= p.element.start && p.payload.end <= p.element.end);
        assert_eq!(&data[p.fourcc_offset..p.fourcc_offset + 4], &p.fourcc);
        let rebuilt = im4p::build(p.fourcc, &p.description, &data[p.payload.clone()]);
        let q = im4p::parse(&rebuilt).expect("a built IM4P parses");
        assert_eq!((q.fourcc, &q.description), (p.fourcc, &p.description));
        assert_eq!(&rebuilt[q.payload], &data[p.payload.clone()]);
        let mut copy = data.to_vec();
        for component in STITCH_COMPONENTS {
            let tag = im4p::rewrite_fourcc(component, &mut copy).expect("parsed before");
            let now = im4p::parse(&copy).expect("a rewritten IM4P parses").fourcc;
            assert_eq!(now, tag.unwrap_or(now));
        }
    }

    let m = im4m::parse(data);
    if let Ok(m) = &m {
        assert!(!m.to_string().is_empty());
        let _ = (m.ecid(), m.chip_id(), m.board_id(), m.ap_nonce_hash());
    }

    let parts = img4::parse_img4(data);
    if let Ok(parts) = &parts {
        im4p::parse(&data[parts.im4p.clone()]).expect("the IM4P part parses alone");
        if let Some(r) = &parts.im4m {
            im4m::parse(&data[r.clone()]).expect("the IM4M part parses alone");
        }
        if let Some(r) = &parts.im4r {
            assert_eq!(der::read(&data[r.clone()]).unwrap().end(), r.len());
        }
    }

    let component = STITCH_COMPONENTS[data.len() % STITCH_COMPONENTS.len()];
    let ticket = small_ticket();
    if p.is_ok() {
        stitch_round_trip(component, data, &ticket, None);
    }
    if m.is_ok() {
        stitch_round_trip(component, &img4::LPOL_IM4P, data, None);
    }
    stitch_round_trip(component, &img4::LPOL_IM4P, &ticket, Some(data));
    if let Ok(parts) = parts {
        if let Some(m) = parts.im4m {
            let r = parts.im4r.map(|r| &data[r]);
            stitch_round_trip(component, &data[parts.im4p], &data[m], r);
        }
    }
}

/// The smallest ticket `im4m::parse` accepts: MANB { MANP { ECID } } and a signature.
fn small_ticket() -> Vec<u8> {
    let int = |v: u64| der::element(der::Tag::INTEGER, &der::encode_uint(v));
    let ecid = der::property(*b"ECID", &int(0x1234));
    let manp = der::property(*b"MANP", &der::element(der::Tag::SET, &ecid));
    let manb = der::property(*b"MANB", &der::element(der::Tag::SET, &manp));
    der::constructed(
        der::Tag::SEQUENCE,
        &[
            &der::element(der::Tag::IA5_STRING, b"IM4M"),
            &int(0),
            &der::element(der::Tag::SET, &manb),
            &der::element(der::Tag::OCTET_STRING, &[0; 8]),
        ],
    )
}

/// Stitch, then check the container splits back into exactly the given parts (the IM4P with
/// only its 4CC rewritten), and that re-stitching those parts is the identity.
fn stitch_round_trip(component: &str, payload: &[u8], ticket: &[u8], im4r: Option<&[u8]>) {
    let im4r_ok = match im4r {
        None => true,
        Some(r) => der::read(r).is_ok_and(|el| {
            el.tag == der::Tag::SEQUENCE && el.content.starts_with(b"\x16\x04IM4R")
        }),
    };
    let valid = im4p::parse(payload).is_ok() && im4m::parse(ticket).is_ok() && im4r_ok;
    let out = match img4::stitch(component, payload, ticket, im4r) {
        Ok(out) => out,
        Err(e) => {
            assert!(!valid, "valid parts failed to stitch: {e}");
            return;
        }
    };
    assert!(valid, "invalid parts stitched");
    let parts = img4::parse_img4(&out).expect("a stitched IMG4 parses");
    let p = im4p::parse(payload).unwrap();
    let original = &payload[p.element.clone()];
    let copied = &out[parts.im4p.clone()];
    assert_eq!(copied.len(), original.len());
    let at = p.fourcc_offset - p.element.start;
    assert_eq!(copied[..at], original[..at]);
    assert_eq!(copied[at + 4..], original[at + 4..]);
    let tag = img4::fourcc::restore_rewrite(component).unwrap_or(p.fourcc);
    assert_eq!(copied[at..at + 4], tag);
    let m = parts.im4m.clone().expect("a stitched IMG4 has its ticket");
    assert_eq!(&out[m.clone()], der::read(ticket).unwrap().raw);
    assert_eq!(im4m::parse(&out[m.clone()]), im4m::parse(ticket));
    assert_eq!(
        parts.im4r.clone().map(|r| &out[r]),
        im4r.map(|r| der::read(r).unwrap().raw)
    );
    let r = parts.im4r.map(|r| &out[r]);
    let again = img4::stitch(component, &out[parts.im4p], &out[m], r).expect("re-stitch");
    assert_eq!(again, out);
}

// ----- usbmux ---------------------------------------------------------------------------------

/// Round trips of the usbmux wire structures over the raw bytes.
pub fn usbmux_wire(data: &[u8]) {
    for layout in [HeaderVersion::V1, HeaderVersion::V2] {
        if let Ok(h) = MuxHeader::parse(data, layout) {
            let mut out = Vec::new();
            h.emit(&mut out);
            assert_eq!(out, data[..layout.header_len()]);
            assert_eq!(MuxHeader::parse(&out, layout), Ok(h));
            assert_eq!(h.version(), layout);
            assert_eq!(Protocol::from_u32(h.protocol.to_u32()), h.protocol);
        }
        if let Ok(p) = MuxPacket::parse(data, layout) {
            assert_eq!(p.header.length as usize, data.len());
            let seq = p.header.v2.map(|s| (s.tx_seq, s.rx_seq));
            let rebuilt = MuxPacket::build(p.header.protocol, seq, &[p.payload]);
            if !matches!(p.header.v2, Some(s) if s.magic != MUX_MAGIC) {
                assert_eq!(rebuilt, data);
            }
            let again = MuxPacket::parse(&rebuilt, layout).expect("a built packet parses");
            assert_eq!(again.payload, p.payload);
        }
    }
    if let Ok((th, payload)) = TcpHeader::parse(data) {
        let bytes = th.to_bytes();
        // Checksum and urgent pointer (16..20) are not kept.
        assert_eq!(bytes[..16], data[..16]);
        assert_eq!(TcpHeader::parse(&bytes), Ok((th, &[][..])));
        assert_eq!(payload, &data[20..]);
        assert_eq!(TcpHeader::window_field(th.window_bytes()), th.window);
    }
    if let Ok(v) = VersionPayload::parse(data) {
        assert_eq!(v.to_bytes()[..], data[..VERSION_PAYLOAD_LEN]);
    }
    if let Ok(c) = ControlPayload::parse(data) {
        assert_eq!(c.to_bytes(), data);
        let _ = c.text_lossy();
    }
}

/// A `Mux` after a scripted handshake (version 2 unless the input starts with 0xFF), with
/// one connection open and one pending, driven by the input as a stream of operations:
/// `op, len, len bytes`, where `op % 8` is
///
/// * 0: the bytes as one bulk IN transfer;
/// * 1: a well-framed mux packet, protocol = first byte, payload = the rest;
/// * 2: a TCP packet for connection `b[0]` (one past the last: ports of no connection) with
///   flags `b[1]`, seq = expected + `b[2]`, payload = the rest;
/// * 3: a TCP packet for connection 0 declared `u16(b[0..2]) % 2048 * 64` bytes long, split
///   into 16 KiB transfers as the device would, its last `b[2]` bytes cut off;
/// * 4: a caller action `b[0] % 8` (connect to port `b[1..3]`, send `b[2] * 256` bytes,
///   recv up to `b[2] * 64 + 1`, close, abort, run timers `b[1] * 4` ms later, peek and
///   consume `b[2]`, check every connection) on connection `b[1]`;
/// * 5: a zero-length transfer;
/// * 6: a full 16 KiB transfer of the bytes repeated;
/// * 7: only the wire round trips on the bytes.
///
/// After each operation every queued OUT transfer and event is drained: no transfer may
/// exceed 49 152 bytes, and each must parse as a mux packet of the agreed layout.
pub fn usbmux(data: &[u8]) {
    usbmux_wire(data);
    let (v1, mut rest) = match data.split_first() {
        Some((0xFF, rest)) => (true, rest),
        _ => (false, data),
    };
    let mut run = MuxRun::start(v1);
    while let [kind, len, tail @ ..] = rest {
        let (arg, next) = tail.split_at(usize::from(*len).min(tail.len()));
        rest = next;
        match kind % 8 {
            0 => run.feed(arg),
            1 => {
                let (protocol, payload) = arg.split_first().map_or((0, &[][..]), |(p, r)| (*p, r));
                let packet = run.packet(Protocol::from_u32(u32::from(protocol)), &[payload]);
                run.feed(&packet);
            }
            2 => {
                if let [conn, flags, delta, payload @ ..] = arg {
                    let packet = run.tcp_to(*conn, *flags, *delta, payload);
                    run.feed(&packet);
                }
            }
            3 => run.large(arg),
            4 => run.action(arg),
            5 => run.feed(&[]),
            6 => {
                let fill: Vec<u8> = if arg.is_empty() {
                    vec![0; RX_TRANSFER_SIZE]
                } else {
                    arg.iter().copied().cycle().take(RX_TRANSFER_SIZE).collect()
                };
                run.feed(&fill);
            }
            _ => usbmux_wire(arg),
        }
    }
}

struct MuxRun {
    mux: Mux,
    layout: HeaderVersion,
    conns: Vec<ConnId>,
    now: Instant,
    device_seq: u16,
}

impl MuxRun {
    fn start(v1: bool) -> Self {
        let mut mux = Mux::new(MuxConfig::default());
        let version = mux.poll_transmit().expect("VERSION is queued at creation");
        let parsed = MuxPacket::parse(&version, HeaderVersion::V1).expect("VERSION parses");
        assert_eq!(parsed.header.protocol, Protocol::Version);
        let major = if v1 { 1 } else { 2 };
        let payload = VersionPayload {
            major,
            minor: 0,
            padding: 0,
        }
        .to_bytes();
        let reply = MuxPacket::build(Protocol::Version, None, &[&payload]);
        mux.on_usb_in(&reply).expect("a supported version");
        assert_eq!(mux.poll_event(), Some(Event::Ready { version: major }));
        let layout = if v1 {
            HeaderVersion::V1
        } else {
            HeaderVersion::V2
        };
        assert_eq!(
            mux.phase(),
            Phase::Active {
                version: major,
                header: layout
            }
        );
        let mut run = Self {
            mux,
            layout,
            conns: Vec::new(),
            now: Instant::now(),
            device_seq: 0,
        };
        run.drain();
        for port in [62078, 1082] {
            let id = run.mux.connect(port).expect("the mux is active");
            run.conns.push(id);
        }
        run.drain();
        let syn_ack = run.tcp_to(0, 0x12, 0, &[]);
        run.feed(&syn_ack);
        run
    }

    fn drain(&mut self) {
        let mut count = 0;
        while let Some(packet) = self.mux.poll_transmit() {
            assert!(
                packet.len() <= MAX_TX_PACKET,
                "{}-byte OUT transfer",
                packet.len()
            );
            if !packet.is_empty() {
                let parsed =
                    MuxPacket::parse(&packet, self.layout).expect("the mux emits whole packets");
                if parsed.header.protocol == Protocol::Tcp {
                    TcpHeader::parse(parsed.payload).expect("the mux emits TCP headers");
                }
            }
            count += 1;
            assert!(count < 10_000, "the transmit queue never drains");
        }
        while self.mux.poll_event().is_some() {}
    }

    fn feed(&mut self, transfer: &[u8]) {
        let _ = self.mux.on_usb_in(transfer);
        self.drain();
    }

    fn packet(&mut self, protocol: Protocol, parts: &[&[u8]]) -> Vec<u8> {
        let seq = match self.layout {
            HeaderVersion::V1 => None,
            HeaderVersion::V2 => {
                self.device_seq = self.device_seq.wrapping_add(1);
                Some((self.device_seq, 0))
            }
        };
        MuxPacket::build(protocol, seq, parts)
    }

    fn conn(&self, index: u8) -> Option<ConnId> {
        self.conns
            .get(usize::from(index) % (self.conns.len() + 1))
            .copied()
    }

    fn tcp_header(&self, conn: u8, flags: u8, delta: u8) -> TcpHeader {
        let info = self.conn(conn).and_then(|id| self.mux.conn_info(id));
        let (src_port, dst_port, seq, ack) = match info {
            Some(i) => (i.dst_port, i.src_port, i.tx_ack, i.tx_seq),
            None => (4321, 1234, 0, 0),
        };
        TcpHeader {
            src_port,
            dst_port,
            seq: seq.wrapping_add(u32::from(delta)),
            ack,
            flags,
            window: 0x0200,
        }
    }

    fn tcp_to(&mut self, conn: u8, flags: u8, delta: u8, payload: &[u8]) -> Vec<u8> {
        let th = self.tcp_header(conn, flags, delta).to_bytes();
        self.packet(Protocol::Tcp, &[&th, payload])
    }

    fn large(&mut self, arg: &[u8]) {
        let units = u16::from_be_bytes([
            arg.first().copied().unwrap_or(0),
            arg.get(1).copied().unwrap_or(0),
        ]);
        let declared = usize::from(units % 2048) * 64;
        let cut = usize::from(arg.get(2).copied().unwrap_or(0));
        let th = self.tcp_header(0, 0x10, 0).to_bytes();
        let overhead = self.layout.header_len() + th.len();
        let payload: Vec<u8> = (0..declared.saturating_sub(overhead))
            .map(|i| i as u8)
            .collect();
        let mut packet = self.packet(Protocol::Tcp, &[&th, &payload]);
        // Shorter than its own headers: keep the declared length anyway.
        packet[4..8].copy_from_slice(&(declared as u32).to_be_bytes());
        packet.truncate(packet.len().saturating_sub(cut));
        for chunk in packet.chunks(RX_TRANSFER_SIZE) {
            self.feed(chunk);
        }
        if packet.len() % RX_TRANSFER_SIZE == 0 {
            self.feed(&[]);
        }
    }

    fn action(&mut self, arg: &[u8]) {
        let byte = |i: usize| arg.get(i).copied().unwrap_or(0);
        let (a, b) = (byte(1), byte(2));
        let conn = self
            .conns
            .get(usize::from(a) % self.conns.len().max(1))
            .copied();
        match (byte(0) % 8, conn) {
            (0, _) => {
                if self.conns.len() < 64 {
                    if let Ok(id) = self.mux.connect(u16::from_be_bytes([a, b])) {
                        self.conns.push(id);
                    }
                }
            }
            (1, Some(id)) => {
                let data = vec![0x5a; usize::from(b) * 256];
                if let Ok(n) = self.mux.send(id, &data) {
                    assert!(n <= data.len());
                }
            }
            (2, Some(id)) => {
                let mut buf = vec![0; usize::from(b) * 64 + 1];
                if let Ok(n) = self.mux.recv(id, &mut buf) {
                    assert!(n <= buf.len());
                }
            }
            (3, Some(id)) => {
                let _ = self.mux.close(id);
            }
            (4, Some(id)) => {
                let _ = self.mux.abort(id);
            }
            (5, _) => {
                self.now += Duration::from_millis(u64::from(a) * 4);
                let _ = self.mux.poll_timeout(self.now);
                self.mux.on_timer(self.now);
            }
            (6, Some(id)) => {
                if let Ok((head, tail)) = self.mux.peek(id) {
                    let available = head.len() + tail.len();
                    match self.mux.consume(id, usize::from(b)) {
                        Ok(consumed) => assert_eq!(consumed, available.min(usize::from(b))),
                        // A reset connection with nothing left to read reports the reset.
                        Err(_) => assert_eq!(available, 0),
                    }
                }
            }
            _ => {
                let config = MuxConfig::default();
                for id in &self.conns {
                    if let Some(info) = self.mux.conn_info(*id) {
                        assert!(info.inbound_len <= config.inbound_capacity);
                        assert!(info.unsent_len <= config.outbound_capacity);
                    }
                }
            }
        }
        self.drain();
    }
}

// ----- restored framing and ASR commands ------------------------------------------------------

/// Splits a stream input into the pieces it arrives in: each piece is a length byte, then
/// that many bytes (fewer at the end).
fn stream_pieces(data: &[u8]) -> Vec<&[u8]> {
    let mut pieces = Vec::new();
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let (piece, next) = tail.split_at(usize::from(len).min(tail.len()));
        pieces.push(piece);
        rest = next;
    }
    pieces
}

/// Largest frame the `restored_framing` target accepts, so the limit is reachable.
pub const FUZZ_MAX_MESSAGE_LEN: usize = 1 << 16;

/// `framing::parse_plist` on the raw bytes, then the restored frame `Decoder` fed the input
/// in pieces (see [`stream_pieces`]), taking every message after each piece. Every message
/// or malformed frame consumes bytes; a decoded dictionary re-encodes to one frame that
/// decodes to the same dictionary.
pub fn restored_framing(data: &[u8]) {
    let _ = framing::parse_plist(data);
    let mut decoder = Decoder::new(FUZZ_MAX_MESSAGE_LEN);
    for piece in stream_pieces(data) {
        decoder.push(piece);
        loop {
            let before = decoder.buffered();
            match decoder.next_message() {
                Ok(Some(dict)) => {
                    assert!(decoder.buffered() < before);
                    let frame = framing::encode(&dict, Encoding::Binary)
                        .expect("a decoded dictionary encodes");
                    let mut again = Decoder::new(usize::MAX);
                    again.push(&frame);
                    let decoded = again
                        .next_message()
                        .expect("an encoded frame decodes")
                        .expect("a whole frame was pushed");
                    assert!(same_dictionary(&decoded, &dict), "re-encoding changed it");
                    assert_eq!(again.buffered(), 0);
                }
                Ok(None) => break,
                // The length prefix cannot be trusted any more: the stream is over.
                Err(FramingError::TooLarge { len, max }) => {
                    assert!(len > max && max == FUZZ_MAX_MESSAGE_LEN);
                    return;
                }
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    assert!(decoder.buffered() < before, "a bad frame was not consumed");
                }
            }
        }
    }
}

/// `asr::parse_command` on the raw bytes, then the ASR `CommandParser` fed the input in
/// pieces (see [`stream_pieces`]), taking every command after each piece. Every command or
/// malformed one consumes bytes, and what stays buffered never exceeds the command limit.
pub fn asr_commands(data: &[u8]) {
    let _ = asr::parse_command(data);
    let mut parser = CommandParser::new();
    for piece in stream_pieces(data) {
        parser.push(piece);
        loop {
            let before = parser.buffered();
            match parser.next_command() {
                Ok(Some(_)) => assert!(parser.buffered() < before),
                Ok(None) => {
                    assert!(parser.buffered() <= MAX_COMMAND_LEN);
                    break;
                }
                Err(AsrError::CommandTooLarge) => return,
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    assert!(parser.buffered() < before, "a bad command was not consumed");
                }
            }
        }
    }
}

/// `==` on plist dictionaries, except that NaN reals equal each other. Not `Debug` text: plist
/// 1.10 panics formatting a `Date` past year 9999, which a binary plist can carry.
fn same_dictionary(a: &plist::Dictionary, b: &plist::Dictionary) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b.iter())
            .all(|((ka, va), (kb, vb))| ka == kb && same_value(va, vb))
}

fn same_value(a: &plist::Value, b: &plist::Value) -> bool {
    use plist::Value;
    match (a, b) {
        (Value::Real(x), Value::Real(y)) => x == y || (x.is_nan() && y.is_nan()),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_value(x, y))
        }
        (Value::Dictionary(x), Value::Dictionary(y)) => same_dictionary(x, y),
        _ => a == b,
    }
}
