//! Replays the TCP exchange of a real `usbmuxd -vv` trace (usbmuxd issue #96, quoted in
//! `shared/fixtures/captures/usbmuxd-verbose-traces-from-issues.txt`) and checks that the mux
//! emits the same `[OUT]` lines usbmuxd logged, field for field.

use restore_agent::usbmux::{Event, Mux, MuxConfig};

/// One logged packet: (sport, dport, seq, ack, flags, window field, payload length).
type Line = (u16, u16, u32, u32, u8, u16, usize);

fn device_packet(tx_seq: u16, line: Line) -> Vec<u8> {
    let (sport, dport, seq, ack, flags, window, len) = line;
    let total = 16 + 20 + len;
    let mut p = Vec::new();
    p.extend_from_slice(&6u32.to_be_bytes());
    p.extend_from_slice(&(total as u32).to_be_bytes());
    p.extend_from_slice(&0xFEED_FACEu32.to_be_bytes());
    p.extend_from_slice(&tx_seq.to_be_bytes());
    p.extend_from_slice(&0u16.to_be_bytes());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&ack.to_be_bytes());
    p.extend_from_slice(&[0x50, flags]);
    p.extend_from_slice(&window.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    p.extend((0..len).map(|i| i as u8));
    p
}

fn host_line(packet: &[u8]) -> Line {
    assert_eq!(&packet[..4], &[0, 0, 0, 6], "TCP mux packet");
    let t = &packet[16..];
    let u16_at = |i: usize| u16::from_be_bytes([t[i], t[i + 1]]);
    let u32_at = |i: usize| u32::from_be_bytes([t[i], t[i + 1], t[i + 2], t[i + 3]]);
    (
        u16_at(0),
        u16_at(2),
        u32_at(4),
        u32_at(8),
        t[13],
        u16_at(14),
        t.len() - 20,
    )
}

fn drain(mux: &mut Mux) -> Vec<Line> {
    std::iter::from_fn(|| mux.poll_transmit())
        .filter(|t| !t.is_empty())
        .map(|t| host_line(&t))
        .collect()
}

#[test]
fn lockdown_connect_and_first_exchange_match_usbmuxd() {
    let mut mux = Mux::new(MuxConfig::default());
    mux.poll_transmit().unwrap();
    mux.on_usb_in(&[0, 0, 0, 0, 0, 0, 0, 20, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0])
        .unwrap();
    // SETUP
    mux.poll_transmit().unwrap();
    // The trace's connection used source port 2: port 1 was taken by an earlier client.
    let earlier = mux.connect(62078).unwrap();
    drain(&mut mux);
    mux.on_usb_in(&device_packet(0, (62078, 1, 0, 1, 0x12, 512, 0)))
        .unwrap();
    drain(&mut mux);
    let id = mux.connect(62078).unwrap();
    assert_ne!(id, earlier);

    // [OUT] dev=1 sport=2 dport=62078 seq=0 ack=0 flags=0x2 window=131072[512] len=0
    assert_eq!(drain(&mut mux), vec![(2, 62078, 0, 0, 0x02, 512, 0)]);
    // [IN]  dev=1 sport=62078 dport=2 seq=0 ack=1 flags=0x12 window=131072[512] len=0
    mux.on_usb_in(&device_packet(1, (62078, 2, 0, 1, 0x12, 512, 0)))
        .unwrap();
    // [OUT] dev=1 sport=2 dport=62078 seq=1 ack=1 flags=0x10 window=131072[512] len=0
    assert_eq!(drain(&mut mux), vec![(2, 62078, 1, 1, 0x10, 512, 0)]);

    // The client writes a 4-byte length prefix, then a 284-byte plist.
    assert_eq!(mux.send(id, &[0, 0, 1, 28]).unwrap(), 4);
    // [OUT] dev=1 sport=2 dport=62078 seq=1 ack=1 flags=0x10 window=131072[512] len=4
    assert_eq!(drain(&mut mux), vec![(2, 62078, 1, 1, 0x10, 512, 4)]);
    assert_eq!(mux.send(id, &[b'x'; 284]).unwrap(), 284);
    // [OUT] dev=1 sport=2 dport=62078 seq=5 ack=1 flags=0x10 window=131072[512] len=284
    assert_eq!(drain(&mut mux), vec![(2, 62078, 5, 1, 0x10, 512, 284)]);

    // [IN]  dev=1 sport=62078 dport=2 seq=1 ack=289 flags=0x10 window=131072[512] len=4
    mux.on_usb_in(&device_packet(2, (62078, 2, 1, 289, 0x10, 512, 4)))
        .unwrap();
    // [OUT] dev=1 sport=2 dport=62078 seq=289 ack=1 flags=0x10 window=131072[512] len=0
    // (ack stays 1: the client has not read the 4 bytes yet)
    assert_eq!(drain(&mut mux), vec![(2, 62078, 289, 1, 0x10, 512, 0)]);
    // [IN]  dev=1 sport=62078 dport=2 seq=5 ack=289 flags=0x10 window=131072[512] len=297
    mux.on_usb_in(&device_packet(3, (62078, 2, 5, 289, 0x10, 512, 297)))
        .unwrap();
    // [OUT] dev=1 sport=2 dport=62078 seq=289 ack=1 flags=0x10 window=131072[512] len=0
    assert_eq!(drain(&mut mux), vec![(2, 62078, 289, 1, 0x10, 512, 0)]);

    let events: Vec<_> = std::iter::from_fn(|| mux.poll_event()).collect();
    assert_eq!(
        events.iter().filter(|e| **e == Event::Readable(id)).count(),
        2
    );
    let mut buf = [0u8; 400];
    assert_eq!(mux.recv(id, &mut buf).unwrap(), 301);
    assert_eq!(mux.conn_info(id).unwrap().tx_ack, 302);
}

#[test]
fn large_sends_are_cut_at_usbmuxds_49116_bytes() {
    // usbmuxd issue #146 logs "update_connection: sendable 49116" for an open window.
    let mut mux = Mux::new(MuxConfig::default());
    mux.poll_transmit().unwrap();
    mux.on_usb_in(&[0, 0, 0, 0, 0, 0, 0, 20, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0])
        .unwrap();
    mux.poll_transmit().unwrap(); // SETUP
    let id = mux.connect(62078).unwrap();
    drain(&mut mux);
    mux.on_usb_in(&device_packet(0, (62078, 1, 0, 1, 0x12, 512, 0)))
        .unwrap();
    drain(&mut mux);
    assert_eq!(mux.send(id, &vec![0u8; 100_000]).unwrap(), 65_536);
    let lens: Vec<usize> = drain(&mut mux).iter().map(|l| l.6).collect();
    assert_eq!(lens, vec![49_116, 16_420]);
    // The outbound buffer stays full until the device acknowledges.
    assert_eq!(mux.send(id, &[0u8; 10]).unwrap(), 0);
    mux.on_usb_in(&device_packet(1, (62078, 1, 1, 1 + 49_116, 0x10, 512, 0)))
        .unwrap();
    let events: Vec<_> = std::iter::from_fn(|| mux.poll_event()).collect();
    assert!(events.contains(&Event::Writable(id)));
    assert_eq!(mux.send(id, &vec![0u8; 100_000]).unwrap(), 49_116);
}
