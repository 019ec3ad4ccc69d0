//! Guest-side check of the libusb edge against `usbip-demo` in the VM (`ci/vm/transport-test.sh`):
//! enumeration, control IN/OUT, a stall, configuration and interface claiming, the device
//! leaving under an open handle, finding it again at the same location with its new identity,
//! bulk OUT, a bulk IN that times out because the device NAKs, and a port reset.
//! Prints `PROBE: …` lines; exits non-zero at the first failed check.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use restore_agent::usb::rusb_edge::RusbBus;
use restore_agent::usb::{ControlSetup, DeviceInfo, TransportError, UsbBus};

const T: Duration = Duration::from_millis(1000);

fn wait_for(bus: &RusbBus, pid: u16) -> Result<DeviceInfo, String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let found = bus.devices().map_err(|e| e.to_string())?;
        if let Some(d) = found
            .into_iter()
            .find(|d| d.vendor_id == 0x05ac && d.product_id == pid)
        {
            return Ok(d);
        }
        if Instant::now() > deadline {
            return Err(format!("05ac:{pid:04x} never appeared"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn check(what: &str, ok: bool, detail: impl std::fmt::Debug) -> Result<(), String> {
    if ok {
        println!("PROBE: ok   {what}: {detail:?}");
        Ok(())
    } else {
        Err(format!("{what}: {detail:?}"))
    }
}

fn probe() -> Result<(), String> {
    let bus = RusbBus::new().map_err(|e| e.to_string())?;
    let dfu = wait_for(&bus, 0x1227)?;
    println!("PROBE: found {dfu:?}");
    let mut h = bus.open(&dfu).map_err(|e| e.to_string())?;

    let dd = h.control_in(ControlSetup::new(0x80, 6, 0x0100, 0), 18, T);
    check(
        "device descriptor",
        matches!(&dd, Ok(d) if d.len() == 18 && d[8..12] == [0xac, 0x05, 0x27, 0x12]),
        &dd,
    )?;
    let short = h.control_in(ControlSetup::new(0x80, 6, 0x0100, 0), 8, T);
    check(
        "short read",
        matches!(&short, Ok(d) if d.len() == 8),
        &short,
    )?;
    let serial = h
        .control_in(ControlSetup::new(0x80, 6, 0x0303, 0x0409), 255, T)
        .map(|d| {
            let units: Vec<u16> = d
                .get(2..)
                .unwrap_or(&[])
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16_lossy(&units)
        });
    check(
        "serial string",
        matches!(&serial, Ok(s) if s.starts_with("CPID:8103 ")),
        &serial,
    )?;
    let stall = h.control_in(ControlSetup::new(0xc0, 0x77, 0, 0), 4, T);
    check("stall", stall == Err(TransportError::Stall), &stall)?;
    let cfg = h.set_configuration(1);
    check("set_configuration(1)", cfg.is_ok(), &cfg)?;
    let claim = h.claim_interface(0, 0);
    check("claim_interface(0, 0)", claim.is_ok(), &claim)?;
    let status = h.control_in(ControlSetup::new(0x80, 0, 0, 0), 2, T);
    check("GET_STATUS", status == Ok(vec![0x80, 0]), &status)?;

    // usbip-demo reboots about a second after being configured.
    let deadline = Instant::now() + Duration::from_secs(10);
    let gone = loop {
        match h.control_in(ControlSetup::new(0x80, 0, 0, 0), 2, T) {
            Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            other => break other,
        }
    };
    check(
        "device left under an open handle",
        matches!(&gone, Err(e) if e.is_gone()),
        &gone,
    )?;
    drop(h);
    // Transfers fail as soon as the port goes inactive; the kernel removes the device a moment
    // later. Only then is the stale DeviceInfo guaranteed to be unusable.
    let deadline = Instant::now() + Duration::from_secs(10);
    while bus.devices().map_err(|e| e.to_string())?.contains(&dfu) {
        if Instant::now() > deadline {
            return Err("the departed device is still listed after 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let reopen = bus.open(&dfu).err();
    check(
        "stale DeviceInfo cannot be opened",
        reopen == Some(TransportError::Disconnected),
        &reopen,
    )?;

    let rec = wait_for(&bus, 0x1281)?;
    check(
        "same location after re-enumeration",
        rec.location == dfu.location && rec.address != dfu.address,
        &rec,
    )?;
    let mut h = bus.open(&rec).map_err(|e| e.to_string())?;
    let cfg = h.set_configuration(1);
    check("set_configuration(1) again", cfg.is_ok(), &cfg)?;
    let claim = h.claim_interface(0, 0);
    check("claim_interface(0, 0) again", claim.is_ok(), &claim)?;
    let big = vec![0x5au8; 256 * 1024];
    let out = h.bulk_out(0x04, &big, T);
    check("bulk OUT 256 KiB", out == Ok(big.len()), &out)?;
    let zlp = h.bulk_out(0x04, &[], T);
    check("bulk OUT zero-length", zlp == Ok(0), &zlp)?;
    let wait = Duration::from_millis(300);
    let nak = h.bulk_in(0x81, 512, wait);
    check(
        "bulk IN on a NAKing endpoint times out",
        nak == Err(TransportError::Timeout(wait)),
        &nak,
    )?;
    // After the unlink the endpoint and the connection must still work.
    let again = h.bulk_out(0x04, b"still alive", T);
    check("bulk OUT after the unlink", again == Ok(11), &again)?;
    let released = h.release_interface(0);
    check("release_interface(0)", released.is_ok(), &released)?;
    let reset = h.reset();
    check(
        "port reset",
        reset.is_ok() || reset == Err(TransportError::Disconnected),
        &reset,
    )?;
    Ok(())
}

fn main() -> ExitCode {
    match probe() {
        Ok(()) => {
            println!("PROBE: all checks passed");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("PROBE: FAILED {e}");
            ExitCode::FAILURE
        }
    }
}
