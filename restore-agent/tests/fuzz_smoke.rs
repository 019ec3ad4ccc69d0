//! The fuzz harness (`fuzz/harness.rs`, shared with the cargo-fuzz targets) run on the stable
//! toolchain: deterministic inputs, random and mutated from real seeds, for every target, plus
//! structured descriptor values checked for `parse(emit(x)) == x`. A failure prints the input
//! to replay.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use restore_agent::usb::descriptor::{
    emit_language_ids, emit_string, parse_language_ids, parse_string, AltSetting, ConfigDescriptor,
    DeviceDescriptor, EndpointDescriptor, Interface, RawDescriptor,
};

#[path = "../../fuzz/harness.rs"]
mod harness;

/// xorshift64*: tiny, deterministic, good enough to spread inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

fn shared() -> PathBuf {
    match std::env::var_os("MACRESCUE_SHARED") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared")),
    }
}

fn seeds(dir: &str) -> Vec<Vec<u8>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(dir);
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds in {}", path.display());
    seeds
}

const TOKENS: &[&[u8]] = &[
    b"CPID:",
    b"CPRV:",
    b"CPFM:",
    b"SCEP:",
    b"BDID:",
    b"ECID:",
    b"IBFL:",
    b"PREV:",
    b"SDOM:",
    b"SRTG:[",
    b"SRNM:[",
    b"IMEI:[",
    b"PWND:[",
    b"NONC:",
    b"SNON:",
    b"]",
    b" ",
    b"_",
    b"\0",
    b"8103",
    b"0005681C34D3001E",
    b"ffffffffffffffffff",
    b"2A813200",
    b"0",
    b"\xc3\xa4",
];

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, tokens: &[&[u8]]) {
    for _ in 0..1 + rng.below(4) {
        let len = input.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = rng.byte();
            }
            2 => {
                let i = rng.below(len + 1);
                let t = rng.pick(tokens);
                input.splice(i..i, t.iter().copied());
            }
            3 if len > 0 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(8)).min(len);
                input.drain(a..b);
            }
            4 if len > 0 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(16)).min(len);
                let copy = input[a..b].to_vec();
                let at = rng.below(len + 1);
                input.splice(at..at, copy);
            }
            5 => input.truncate(rng.below(len + 1)),
            6 if len > 0 => {
                // Interesting byte values at a random place (lengths, types).
                let i = rng.below(len);
                input[i] = *rng.pick(&[0, 1, 2, 3, 4, 5, 7, 9, 18, 0x21, 0x7f, 0x80, 0xff]);
            }
            _ => {
                let i = rng.below(len + 1);
                let b = rng.byte();
                input.insert(i, b);
            }
        }
    }
}

/// Run `f` on `input`, turning a panic into a failure that shows the input.
fn check(name: &str, f: fn(&[u8]), input: &[u8]) {
    if catch_unwind(AssertUnwindSafe(|| f(input))).is_err() {
        panic!(
            "{name} panicked on input {input:02x?} ({:?})",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn serial_string_harness() {
    let mut corpus = seeds("serial_string");
    let fixture = shared().join("fixtures/usb/usb-ids-and-serial-strings-from-issues.txt");
    let text = std::fs::read_to_string(&fixture)
        .unwrap_or_else(|e| panic!("reading {}: {e}", fixture.display()));
    corpus.extend(text.lines().map(|l| l.as_bytes().to_vec()));
    for seed in &corpus {
        check("serial_string", harness::serial_string, seed);
    }

    let mut rng = Rng(0x6d61_6372_6573_6375);
    for _ in 0..50_000 {
        let input = if rng.chance(25) {
            // Token soup: tags, hex, separators.
            let mut v = Vec::new();
            for _ in 0..rng.below(24) {
                if rng.chance(70) {
                    let token = *rng.pick(TOKENS);
                    v.extend_from_slice(token);
                } else {
                    let n = rng.below(20);
                    v.extend((0..n).map(|_| *rng.pick(b"0123456789abcdefABCDEFxyz:[] ")));
                }
            }
            v
        } else if rng.chance(10) {
            let n = rng.below(200);
            rng.bytes(n)
        } else {
            let mut v = rng.pick(&corpus).clone();
            mutate(&mut rng, &mut v, TOKENS);
            v
        };
        check("serial_string", harness::serial_string, &input);
    }
}

#[test]
fn descriptors_harness() {
    let corpus = seeds("descriptors");
    for seed in &corpus {
        check("descriptors", harness::descriptors, seed);
    }
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let mut parsed_configs = 0;
    for _ in 0..50_000 {
        let mut input = if rng.chance(10) {
            let n = rng.below(64);
            rng.bytes(n)
        } else {
            let mut v = rng.pick(&corpus).clone();
            mutate(&mut rng, &mut v, TOKENS);
            v
        };
        // Often keep wTotalLength/bLength consistent with the mutated size, so mutations reach
        // past the header checks.
        if input.len() >= 4 && input[1] == 2 && rng.chance(60) {
            let len = input.len() as u16;
            input[2..4].copy_from_slice(&len.to_le_bytes());
        } else if !input.is_empty() && input.len() < 256 && rng.chance(30) {
            input[0] = input.len() as u8;
        }
        if ConfigDescriptor::parse(&input).is_ok() {
            parsed_configs += 1;
        }
        check("descriptors", harness::descriptors, &input);
    }
    // The run is only meaningful if mutated configurations get through the parser often.
    assert!(
        parsed_configs > 1000,
        "only {parsed_configs} configurations parsed"
    );
}

fn raw(rng: &mut Rng) -> RawDescriptor {
    // Types 4 and 5 would read back as interface/endpoint, not as class-specific descriptors.
    let descriptor_type = *rng.pick(&[0x21, 0x24, 0x25, 0x0b, 0x30, 0x02, 0xff]);
    let n = rng.below(12);
    RawDescriptor {
        descriptor_type,
        data: rng.bytes(n),
    }
}

fn raws(rng: &mut Rng) -> Vec<RawDescriptor> {
    let n = if rng.chance(70) { 0 } else { 1 + rng.below(2) };
    (0..n).map(|_| raw(rng)).collect()
}

fn random_config(rng: &mut Rng) -> ConfigDescriptor {
    let mut numbers: Vec<u8> = Vec::new();
    for _ in 0..rng.below(4) {
        let n = rng.byte();
        if !numbers.contains(&n) {
            numbers.push(n);
        }
    }
    let tail_len = if rng.chance(80) { 0 } else { rng.below(3) };
    ConfigDescriptor {
        configuration_value: rng.byte(),
        configuration_index: rng.byte(),
        attributes: rng.byte(),
        max_power: rng.byte(),
        tail: rng.bytes(tail_len),
        extra: raws(rng),
        interfaces: numbers
            .into_iter()
            .map(|number| Interface {
                number,
                alt_settings: (0..1 + rng.below(3))
                    .map(|_| {
                        let tail_len = if rng.chance(80) { 0 } else { rng.below(3) };
                        AltSetting {
                            alternate_setting: rng.byte(),
                            class: rng.byte(),
                            subclass: rng.byte(),
                            protocol: rng.byte(),
                            interface_index: rng.byte(),
                            tail: rng.bytes(tail_len),
                            extra: raws(rng),
                            endpoints: (0..rng.below(4))
                                .map(|_| {
                                    let tail_len = if rng.chance(80) { 0 } else { 2 };
                                    EndpointDescriptor {
                                        address: rng.byte(),
                                        attributes: rng.byte(),
                                        max_packet_size: rng.next() as u16,
                                        interval: rng.byte(),
                                        tail: rng.bytes(tail_len),
                                        extra: raws(rng),
                                    }
                                })
                                .collect(),
                        }
                    })
                    .collect(),
            })
            .collect(),
    }
}

#[test]
fn structured_values_round_trip() {
    let mut rng = Rng(0xfeed_face_cafe_beef);
    for _ in 0..5_000 {
        let d = DeviceDescriptor {
            bcd_usb: rng.next() as u16,
            device_class: rng.byte(),
            device_subclass: rng.byte(),
            device_protocol: rng.byte(),
            max_packet_size0: rng.byte(),
            vendor_id: rng.next() as u16,
            product_id: rng.next() as u16,
            bcd_device: rng.next() as u16,
            manufacturer_index: rng.byte(),
            product_index: rng.byte(),
            serial_number_index: rng.byte(),
            num_configurations: rng.byte(),
        };
        assert_eq!(DeviceDescriptor::parse(&d.emit()), Ok(d));

        let c = random_config(&mut rng);
        let bytes = c.emit().expect("small configurations emit");
        assert_eq!(
            ConfigDescriptor::parse(&bytes),
            Ok(c.clone()),
            "bytes {bytes:02x?}"
        );

        let chars: String = (0..rng.below(126))
            .map(|_| *rng.pick(&['A', 'z', '0', ':', ' ', '[', 'é', '€', '\u{0}']))
            .collect();
        assert_eq!(parse_string(&emit_string(&chars).unwrap()), Ok(chars));

        let ids: Vec<u16> = (0..rng.below(127)).map(|_| rng.next() as u16).collect();
        assert_eq!(
            parse_language_ids(&emit_language_ids(&ids).unwrap()),
            Ok(ids)
        );
    }
}

// ----- the format targets ---------------------------------------------------------------------

/// `count`, scaled by `MACRESCUE_FUZZ_SCALE` (e.g. 10 for a longer local run).
fn scaled(count: usize) -> usize {
    let scale = std::env::var("MACRESCUE_FUZZ_SCALE")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(1);
    count * scale.max(1)
}

/// Runs `f` on every seed, then on `count` inputs: mostly mutated seeds (format tokens
/// spliced in), some token soup, a few random byte strings. `reached` counts the inputs that
/// got past the first parsing layer; at least `min_reached` must, or the run proves nothing.
#[allow(clippy::too_many_arguments)]
fn run_target(
    name: &str,
    f: fn(&[u8]),
    corpus: &[Vec<u8>],
    tokens: &[&[u8]],
    rng_seed: u64,
    count: usize,
    reached: fn(&[u8]) -> bool,
    min_reached: usize,
) {
    for seed in corpus {
        check(name, f, seed);
    }
    let mut rng = Rng(rng_seed);
    let mut hits = 0;
    let count = scaled(count);
    for _ in 0..count {
        let input = if rng.chance(5) {
            let n = rng.below(300);
            rng.bytes(n)
        } else if rng.chance(10) {
            let mut v = Vec::new();
            for _ in 0..rng.below(16) {
                let token = *rng.pick(tokens);
                v.extend_from_slice(token);
            }
            v
        } else {
            let mut v = rng.pick(corpus).clone();
            mutate(&mut rng, &mut v, tokens);
            v
        };
        if reached(&input) {
            hits += 1;
        }
        check(name, f, &input);
    }
    eprintln!("{name}: {hits} of {count} inputs got past the first parser");
    assert!(
        hits >= min_reached.min(count),
        "{name}: only {hits} of {count} inputs got past the first parser"
    );
}

#[test]
fn zip_central_directory_harness() {
    use restore_agent::ipsw::ZipArchive;
    const TOKENS: &[&[u8]] = &[
        b"PK\x01\x02",
        b"PK\x03\x04",
        b"PK\x05\x06",
        b"PK\x06\x06",
        b"PK\x06\x07",
        b"\xff\xff\xff\xff",
        b"\xff\xff",
        b"\x01\x00\x10\x00",
        b"\x01\x00\x18\x00",
        b"\x00\x00\x00\x00",
        b"\x08\x00",
        b"\x01\x00",
    ];
    run_target(
        "zip_central_directory",
        harness::zip_central_directory,
        &seeds("zip_central_directory"),
        TOKENS,
        0x7a69_7063_6472_0001,
        50_000,
        |input| ZipArchive::open(input.to_vec()).is_ok(),
        2_000,
    );
}

#[test]
fn catalog_harness() {
    use restore_agent::catalog::{parse_ipsw_me_device, MesuCatalog};
    const TOKENS: &[&[u8]] = &[
        b"<key>",
        b"</key>",
        b"<dict>",
        b"</dict>",
        b"<string>",
        b"</string>",
        b"<dict/>",
        b"SameAs",
        b"Restore",
        b"Unknown",
        b"Universal",
        b"BuildVersion",
        b"ProductVersion",
        b"FirmwareURL",
        b"FirmwareSHA1",
        b"https://",
        b"http://",
        b"protected://",
        b"26.3.1",
        b"25D2128",
        b"25C56",
        b".",
        b"\"identifier\":\"Macmini9,1\"",
        b"\"firmwares\":[",
        b"\"version\":\"",
        b"\"buildid\":\"",
        b"\"url\":\"",
        b"\"sha1sum\":\"",
        b"{",
        b"}",
        b"]",
        b",",
        b"\"",
        b" ",
        b"0123456789abcdef0123456789abcdef01234567",
    ];
    run_target(
        "catalog",
        harness::catalog,
        &seeds("catalog"),
        TOKENS,
        0x6361_7461_6c6f_6701,
        12_000,
        |input| {
            MesuCatalog::parse(input).is_ok() || parse_ipsw_me_device(input, "Macmini9,1").is_ok()
        },
        500,
    );
}

#[test]
fn manifest_harness() {
    use restore_agent::manifest::BuildManifest;
    const TOKENS: &[&[u8]] = &[
        b"<key>",
        b"</key>",
        b"<dict>",
        b"</dict>",
        b"<true/>",
        b"<false/>",
        b"<string>",
        b"</string>",
        b"IsLoadedByiBoot",
        b"IsLoadedByiBootStage1",
        b"iBSS",
        b"iBEC",
        b"RestoreLogo",
        b"RestoreRamDisk",
        b"Erase",
        b"Update",
        b"Research",
        b"Erase Install (IPSW)",
        b"Upgrade Install (IPSW)",
        b"DeviceClass",
        b"RestoreBehavior",
        b"Variant",
        b"0x8103",
        b"0x22",
        b"<integer>",
        b"</integer>",
        b"\x09",
        b"\x11",
        b"\xd1",
    ];
    run_target(
        "manifest",
        harness::manifest,
        &seeds("manifest"),
        TOKENS,
        0x6d61_6e69_6665_7374,
        12_000,
        |input| BuildManifest::from_bytes(input).is_ok(),
        300,
    );
}

#[test]
fn tss_response_harness() {
    use restore_agent::tss::parse_response;
    const TOKENS: &[&[u8]] = &[
        b"STATUS=",
        b"MESSAGE=",
        b"SUCCESS",
        b"&",
        b"REQUEST_STRING=",
        b"<?xml version=\"1.0\"?>",
        b"<plist version=\"1.0\">",
        b"<dict>",
        b"</dict>",
        b"<key>",
        b"</key>",
        b"<data>",
        b"</data>",
        b"ApImg4Ticket",
        b"-TBM",
        b"ucon",
        b"ucer",
        b"94",
        b"0",
        b"MAA=",
    ];
    run_target(
        "tss_response",
        harness::tss_response,
        &seeds("tss_response"),
        TOKENS,
        0x7473_735f_7265_7370,
        20_000,
        |input| parse_response(input).is_ok(),
        250,
    );
}

#[test]
fn firmware_updater_harness() {
    const TOKENS: &[&[u8]] = &[
        b"MessageArgUpdaterName",
        b"MessageArgInfo",
        b"MessageArgType",
        b"FirmwareResponseData",
        b"AppleTypeCRetimer",
        b"AppleTCON",
        b"T200",
        b"Rose",
        b"Cryptex1",
        b"InfoArray",
        b"HardwareID",
        b"TagNumber",
        b"TicketName",
        b"ResponseTags",
        b"FirmwareData",
        b"DeviceGeneratedRequest",
        b"ftab",
        b"rkos",
        b"rrko",
        b"\xff\xff\xff\xff",
    ];
    run_target(
        "firmware_updater",
        harness::firmware_updater,
        &seeds("firmware_updater"),
        TOKENS,
        0x6677_7570_6461_7465,
        20_000,
        |input| {
            restore_agent::ftab::Ftab::parse(input).is_ok()
                || matches!(
                    plist::Value::from_reader(std::io::Cursor::new(input)),
                    Ok(plist::Value::Dictionary(_))
                )
        },
        100,
    );
}

#[test]
fn img4_harness() {
    use restore_agent::img4::der;
    const TOKENS: &[&[u8]] = &[
        b"\x30",
        b"\x31",
        b"\x16\x04",
        b"IM4P",
        b"IM4M",
        b"IMG4",
        b"IM4R",
        b"MANB",
        b"MANP",
        b"\xa0",
        b"\xa1",
        b"\x81",
        b"\x82",
        b"\x84\xff\xff\xff\xff",
        b"\x85",
        b"\x80",
        b"\xff\x84\x80\x80\x80\x01",
        b"\x1f",
        b"\x04",
        b"\x02\x01\x00",
        b"\x01\x01\xff",
    ];
    run_target(
        "img4",
        harness::img4,
        &seeds("img4"),
        TOKENS,
        0x696d_6734_6675_7a7a,
        25_000,
        |input| der::read(input).is_ok(),
        10_000,
    );
}

#[test]
fn usbmux_harness() {
    // Whole operations of the usbmux target's input language (see `harness::usbmux`).
    const TOKENS: &[&[u8]] = &[
        &[2, 3, 0, 0x10, 0],
        &[2, 7, 0, 0x10, 0, b'd', b'a', b't', b'a'],
        &[2, 3, 1, 0x12, 0],
        &[2, 3, 0, 0x04, 0],
        &[2, 5, 0, 0x14, 0, b'n', b'o'],
        &[2, 3, 3, 0x10, 9],
        &[4, 3, 0, 0x1f, 0x5e],
        &[4, 3, 1, 0, 0xff],
        &[4, 3, 2, 0, 0x10],
        &[4, 3, 3, 0, 0],
        &[4, 3, 4, 1, 0],
        &[4, 3, 5, 0x20, 0],
        &[4, 3, 6, 0, 4],
        &[4, 3, 7, 0, 0],
        &[3, 2, 1, 0x40],
        &[3, 3, 0, 0xff, 2],
        &[3, 2, 4, 0x00],
        &[1, 4, 1, 7, b'h', b'i'],
        &[1, 13, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0],
        &[1, 2, 2, 7],
        &[0, 8, 0, 0, 0, 6, 0, 0, 0, 8],
        &[5, 0],
        &[6, 2, 0, 0],
        &[7, 4, 0, 0, 0, 1],
    ];
    run_target(
        "usbmux",
        harness::usbmux,
        &seeds("usbmux"),
        TOKENS,
        0x7573_626d_7578_0001,
        20_000,
        |input| input.len() >= 2,
        10_000,
    );
}

/// Counts the messages a stream input yields, piece by piece (as the harness feeds it).
fn stream_yields(input: &[u8], mut take: impl FnMut(&[u8]) -> usize) -> bool {
    let mut rest = input;
    let mut total = 0;
    while let Some((&len, tail)) = rest.split_first() {
        let (piece, next) = tail.split_at(usize::from(len).min(tail.len()));
        total += take(piece);
        rest = next;
    }
    total > 0
}

#[test]
fn restored_framing_harness() {
    use restore_agent::restored::framing::Decoder;
    const TOKENS: &[&[u8]] = &[
        b"\x00\x00\x00",
        b"\x00\x00\x01\x00",
        b"\xff\xff\xff\xff",
        b"bplist00",
        b"<?xml version=\"1.0\"?>",
        b"<plist version=\"1.0\">",
        b"</plist>",
        b"<dict>",
        b"</dict>",
        b"<key>MsgType</key>",
        b"<string>StatusMsg</string>",
        b"<integer>0</integer>",
        b"\xd1\x01\x02",
        b"\x08",
        b"\n",
    ];
    run_target(
        "restored_framing",
        harness::restored_framing,
        &seeds("restored_framing"),
        TOKENS,
        0x7265_7374_6f72_6564,
        25_000,
        |input| {
            let mut decoder = Decoder::new(harness::FUZZ_MAX_MESSAGE_LEN);
            stream_yields(input, |piece| {
                decoder.push(piece);
                let mut n = 0;
                while let Ok(Some(_)) = decoder.next_message() {
                    n += 1;
                }
                n
            })
        },
        1_500,
    );
}

#[test]
fn asr_commands_harness() {
    use restore_agent::asr::CommandParser;
    const TOKENS: &[&[u8]] = &[
        b"</plist>",
        b"<plist version=\"1.0\">",
        b"<?xml version=\"1.0\"?>",
        b"<dict>",
        b"</dict>",
        b"<key>Command</key>",
        b"<string>OOBData</string>",
        b"<string>Payload</string>",
        b"<key>OOB Offset</key>",
        b"<key>OOB Length</key>",
        b"<integer>18446744073709551615</integer>",
        b"<integer>-1</integer>",
        b"<true/>",
        b"\n",
        b" ",
    ];
    run_target(
        "asr_commands",
        harness::asr_commands,
        &seeds("asr_commands"),
        TOKENS,
        0x6173_725f_636d_6473,
        25_000,
        |input| {
            let mut parser = CommandParser::new();
            stream_yields(input, |piece| {
                parser.push(piece);
                let mut n = 0;
                while let Ok(Some(_)) = parser.next_command() {
                    n += 1;
                }
                n
            })
        },
        1_500,
    );
}
