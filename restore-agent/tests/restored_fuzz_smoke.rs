//! Deterministic fuzzing of the restore-mode parsers that read bytes chosen by the Mac: the
//! restored frame decoder (plus message parsing of whatever decodes), the ASR command splitter,
//! and the reverse-proxy plist reader's framing. Random and mutated-seed inputs; none may
//! panic, and what decodes must re-encode and decode to the same value.

use plist::{Dictionary, Value};
use restore_agent::asr::{parse_command, CommandParser};
use restore_agent::restored::framing::{self, Decoder, Encoding};
use restore_agent::restored::messages::DeviceMessage;

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
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..=rng.below(8) {
        match rng.below(5) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v.truncate(i);
            }
            2 => {
                let i = rng.below(v.len() + 1);
                v.insert(i, rng.next() as u8);
            }
            3 if v.len() > 4 => {
                let i = rng.below(v.len() - 4);
                v[i..i + 4].copy_from_slice(&(rng.next() as u32).to_be_bytes());
            }
            _ => {
                let extra: Vec<u8> = (0..rng.below(16)).map(|_| rng.next() as u8).collect();
                v.extend(extra);
            }
        }
    }
    v
}

fn frames_harness(data: &[u8]) {
    let mut dec = Decoder::new(1 << 20);
    // Feed in two pieces to exercise partial input.
    let cut = data.len() / 3;
    dec.push(&data[..cut]);
    let _ = dec.next_message();
    dec.push(&data[cut..]);
    for _ in 0..8 {
        match dec.next_message() {
            Ok(Some(d)) => {
                // Binary plists can carry UIDs, which XML cannot express; everything decoded
                // must still re-encode as binary and come back the same.
                let frame = framing::encode(&d, Encoding::Binary).expect("re-encodes as binary");
                let mut again = Decoder::default();
                again.push(&frame);
                let back = again.next_message().unwrap().unwrap();
                // NaN reals compare unequal to themselves; compare their encodings instead.
                assert_eq!(
                    framing::encode(&back, Encoding::Binary).unwrap(),
                    frame,
                    "binary round trip"
                );
                if let Ok(xml) = framing::encode(&d, Encoding::Xml) {
                    let mut again = Decoder::default();
                    again.push(&xml);
                    assert!(again.next_message().unwrap().is_some(), "XML round trip");
                }
                let _ = DeviceMessage::parse(d);
            }
            Ok(None) => break,
            Err(_) => {}
        }
    }
}

fn asr_harness(data: &[u8]) {
    let mut p = CommandParser::new();
    p.push(data);
    for _ in 0..8 {
        match p.next_command() {
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    let _ = parse_command(data);
}

fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let msgs: Vec<Dictionary> = vec![
        [
            ("MsgType", Value::from("DataRequestMsg")),
            ("DataType", "SystemImageData".into()),
            ("DataPort", Value::Integer(12345.into())),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
        [
            ("MsgType", Value::from("StatusMsg")),
            ("Status", Value::Integer(0.into())),
            ("Log", "log".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
        [
            ("MsgType", Value::from("RestoredCrash")),
            ("RestoredBacktrace", Value::Array(vec!["a".into()])),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
    ];
    for m in &msgs {
        out.push(framing::encode(m, Encoding::Xml).unwrap());
        out.push(framing::encode(m, Encoding::Binary).unwrap());
    }
    out.push(b"<?xml version=\"1.0\"?><plist><dict><key>Command</key><string>OOBData</string><key>OOB Offset</key><integer>5</integer><key>OOB Length</key><integer>7</integer></dict></plist>\n".to_vec());
    out.push(b"<plist><dict><key>Command</key><string>Initiate</string><key>Checksum Chunks</key><true/></dict></plist>\n".to_vec());
    out
}

#[test]
fn restore_mode_parsers_survive_random_and_mutated_input() {
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    let seeds = seeds();
    for seed in &seeds {
        frames_harness(seed);
        asr_harness(seed);
    }
    for i in 0..20_000 {
        let input = if i % 3 == 0 {
            (0..rng.below(300)).map(|_| rng.next() as u8).collect()
        } else {
            let seed = &seeds[rng.below(seeds.len())];
            mutate(&mut rng, seed)
        };
        frames_harness(&input);
        asr_harness(&input);
    }
}
