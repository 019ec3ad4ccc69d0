//! What a Linux kernel and libusb read at enumeration, per mode, as raw setup packets.

mod common;

use common::{setup, Host, ECID};
use mac_sim::faults::{Faults, StartMode};
use mac_sim::wire::{Reply, SimDevice};

/// The kernel's sequence (test-infra.md §3): device 64 then 18, config 9 then full,
/// string 0, strings 2/1/3 with langid 0x0409, SET_CONFIGURATION 1.
fn kernel_enumerates(h: &mut Host) -> (Vec<u8>, Vec<u8>) {
    let Reply::Ack(dev64) = h.descriptor(1, 0, 0, 64) else {
        panic!()
    };
    assert_eq!(
        dev64.len(),
        18,
        "device descriptor is 18 bytes, even when 64 are asked"
    );
    let Reply::Ack(dev) = h.descriptor(1, 0, 0, 18) else {
        panic!()
    };
    assert_eq!(dev, dev64);
    let Reply::Ack(head) = h.descriptor(2, 0, 0, 9) else {
        panic!()
    };
    assert_eq!(head.len(), 9);
    let total = u16::from_le_bytes([head[2], head[3]]);
    let Reply::Ack(config) = h.descriptor(2, 0, 0, total) else {
        panic!()
    };
    assert_eq!(config.len(), usize::from(total));
    assert_eq!(config[..9], head[..]);
    assert_eq!(
        h.descriptor(3, 0, 0, 255),
        Reply::Ack(vec![4, 3, 0x09, 0x04])
    );
    for i in [2, 1, 3] {
        assert!(matches!(h.descriptor(3, i, 0x0409, 255), Reply::Ack(_)));
    }
    assert_eq!(h.set_configuration(1), Reply::Ack(vec![]));
    assert_eq!(h.in_data(setup(0x80, 8, 0, 0, 1)), [1]);
    (dev, config)
}

#[test]
fn dfu_mode_enumerates_like_the_rom() {
    let mut h = Host::new(StartMode::Dfu, Faults::default());
    let (dev, config) = kernel_enumerates(&mut h);
    assert_eq!(
        dev,
        [18, 1, 0x00, 0x02, 0, 0, 0, 64, 0xac, 0x05, 0x27, 0x12, 0, 0, 2, 3, 4, 1]
    );
    // one interface FE/01/02 with the DFU functional descriptor (wTransferSize 0x800)
    assert_eq!(config[9..18], [9, 4, 0, 0, 0, 0xfe, 0x01, 0x02, 0]);
    assert_eq!(
        config[18..27],
        [9, 0x21, 0x01, 10, 0, 0x00, 0x08, 0x10, 0x01]
    );
    assert_eq!(h.string(2), "Apple Inc.");
    assert_eq!(h.string(3), "Apple Mobile Device (DFU Mode)");
    assert_eq!(
        h.serial(),
        format!("SDOM:01 CPID:8103 CPRV:11 CPFM:03 SCEP:01 BDID:22 ECID:{ECID:016X} IBFL:3C SRTG:[iBoot-6723.100.10]")
    );
    let nonces = h.string(1);
    let (nonc, snon) = nonces.split_once(' ').unwrap();
    assert_eq!(
        hex::decode(nonc.strip_prefix("NONC:").unwrap())
            .unwrap()
            .len(),
        32
    );
    assert_eq!(
        hex::decode(snon.strip_prefix("SNON:").unwrap())
            .unwrap()
            .len(),
        20
    );
    assert_eq!(nonc[5..], hex::encode_upper(h.mac.identity().ap_nonce));
}

#[test]
fn recovery_mode_enumerates_with_two_interfaces() {
    let mut h = Host::new(StartMode::Recovery, Faults::default());
    let (dev, config) = kernel_enumerates(&mut h);
    assert_eq!(dev[10..12], [0x81, 0x12]);
    assert_eq!(config[4], 2);
    assert_eq!(h.string(3), "Apple Mobile Device (Recovery Mode)");
    let serial = h.serial();
    assert!(!serial.contains("SRTG"), "{serial}");
    assert!(
        serial.contains(&format!("ECID:{ECID:016X} IBFL:3D SRNM:[")),
        "{serial}"
    );
    assert!(h.string(1).starts_with("NONC:"));
    // libirecovery: interface 1 alt 1 for the console, then back to 0/0.
    assert_eq!(
        h.control(setup(0x01, 0x0b, 1, 1, 0), &[]),
        Reply::Ack(vec![])
    );
    assert_eq!(h.in_data(setup(0x81, 0x0a, 0, 1, 1)), [1]);
    assert_eq!(h.control(setup(0x01, 0x0b, 2, 1, 0), &[]), Reply::Stall);
    assert_eq!(h.control(setup(0x01, 0x0b, 0, 5, 0), &[]), Reply::Stall);
    assert_eq!(
        h.control(setup(0x01, 0x0b, 0, 0, 0), &[]),
        Reply::Ack(vec![])
    );
}

#[test]
fn port_dfu_enumerates_with_packed_bdid() {
    let mut h = Host::new(StartMode::PortDfu, Faults::default());
    let (dev, config) = kernel_enumerates(&mut h);
    assert_eq!(dev[10..12], [0x14, 0xf0]);
    assert_eq!(config[23..25], [0x40, 0x00], "wTransferSize 64");
    let serial = h.serial();
    let bdid = serial
        .split(' ')
        .find_map(|t| t.strip_prefix("BDID:"))
        .unwrap();
    let bdid = u32::from_str_radix(bdid, 16).unwrap();
    assert_eq!(((bdid >> 8) & 0xffff, (bdid >> 24) & 0xff), (0x8103, 0x22));
    assert!(serial.contains(" PREV:02 "), "{serial}");
}

#[test]
fn descriptors_truncate_to_wlength_and_unknown_requests_stall() {
    let mut h = Host::new(StartMode::Dfu, Faults::default());
    assert_eq!(
        h.descriptor(1, 0, 0, 8),
        Reply::Ack(vec![18, 1, 0, 2, 0, 0, 0, 64])
    );
    let Reply::Ack(s) = h.descriptor(3, 4, 0x0409, 2) else {
        panic!()
    };
    assert_eq!(s[1], 3);
    assert_eq!(s.len(), 2);
    assert_eq!(h.descriptor(3, 7, 0x0409, 255), Reply::Stall, "no string 7");
    assert_eq!(
        h.descriptor(2, 1, 0, 255),
        Reply::Stall,
        "one configuration only"
    );
    assert_eq!(h.descriptor(6, 0, 0, 10), Reply::Stall, "device qualifier");
    assert_eq!(h.set_configuration(2), Reply::Stall);
    assert_eq!(h.in_data(setup(0x80, 0, 0, 0, 2)), [0, 0]);
    assert_eq!(
        h.control(setup(0x00, 0x03, 1, 0, 0), &[]),
        Reply::Stall,
        "SET_FEATURE"
    );
    // Vendor requests mean nothing to the ROM.
    assert_eq!(h.control(setup(0x40, 0, 0, 0, 3), b"go\0"), Reply::Stall);
    // Before SET_CONFIGURATION the configuration is 0.
    let mut h = Host::new(StartMode::Dfu, Faults::default());
    assert_eq!(h.in_data(setup(0x80, 8, 0, 0, 1)), [0]);
    assert_eq!(
        h.mac.bulk_out(0x04, b"x"),
        Reply::Stall,
        "no bulk endpoint in DFU"
    );
}

#[test]
fn strings_answer_any_language_id() {
    let mut h = Host::new(StartMode::Dfu, Faults::default());
    let Reply::Ack(d) = h.descriptor(3, 4, 0, 255) else {
        panic!()
    };
    assert_eq!(d[2..4], [b'S', 0]);
}

#[test]
fn random_traffic_never_panics() {
    use mac_sim::wire::Setup;
    let mut seed: u64 = 0x5eed;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for start in [StartMode::Dfu, StartMode::PortDfu, StartMode::Recovery] {
        let mut mac = common::new_mac(start, Faults::default());
        let now = std::time::Instant::now();
        for i in 0..20_000u32 {
            let r = next();
            let mut b = r.to_le_bytes();
            // Mostly requests a host would send, some pure noise.
            if i % 4 != 0 {
                b[0] = [0x80, 0x00, 0x21, 0xa1, 0x40, 0xc0, 0x41, 0x01][(r >> 60) as usize & 7];
                b[1] &= 0x0f;
            }
            let s = Setup::from_bytes(b);
            let data: Vec<u8> = (0..(s.length as usize % 300))
                .map(|j| (r >> (j % 56)) as u8)
                .collect();
            let _ = mac.control(&s, if s.is_in() { &[] } else { &data });
            let _ = mac.bulk_out((r >> 8) as u8, &data);
            let _ = mac.bulk_in((r >> 16) as u8, 4096);
            if i % 1000 == 0 {
                mac.reset();
            }
            let _ = mac.poll_link(now + std::time::Duration::from_millis(u64::from(i)));
        }
    }
}
