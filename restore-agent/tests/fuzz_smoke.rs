//! The fuzz harness (`fuzz/harness.rs`, shared with the cargo-fuzz targets) run on the stable
//! toolchain: ~100k deterministic inputs, random and mutated from real seeds, plus structured
//! descriptor values checked for `parse(emit(x)) == x`. A failure prints the input to replay.

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

fn mutate(rng: &mut Rng, input: &mut Vec<u8>) {
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
                let t = rng.pick(TOKENS);
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
            mutate(&mut rng, &mut v);
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
            mutate(&mut rng, &mut v);
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
