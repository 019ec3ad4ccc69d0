//! Stand-in for `restore-agent devices --watch --json` used by `ci/vm/hotplug-test.sh` until
//! that command exists: prints one JSON line per hotplug event seen through [`RusbBus`], in the
//! form the real command uses (`event`, `location`, `vendor_id`, `product_id`, `address`).
//! It exists to exercise the libusb edge's udev-less hotplug inside the VM; `--poll` forces the
//! polling fallback instead.

use std::process::ExitCode;

use restore_agent::usb::rusb_edge::RusbBus;
use restore_agent::usb::{HotplugEvent, UsbBus};

fn main() -> ExitCode {
    let poll = std::env::args().any(|a| a == "--poll");
    let bus = match if poll {
        RusbBus::new_polling()
    } else {
        RusbBus::new()
    } {
        Ok(b) => b,
        Err(e) => {
            eprintln!("watch-devices: {e}");
            return ExitCode::FAILURE;
        }
    };
    let events = match bus.watch() {
        Ok(rx) => rx,
        Err(e) => {
            eprintln!("watch-devices: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "watch-devices: watching ({})",
        if poll {
            "polling"
        } else if rusb::has_hotplug() {
            "libusb hotplug"
        } else {
            "libusb without hotplug: polling"
        }
    );
    for event in events {
        let (kind, d) = match event {
            HotplugEvent::Arrived(d) => ("arrived", d),
            HotplugEvent::Left(d) => ("left", d),
        };
        let line = serde_json::json!({
            "event": kind,
            "location": d.location.to_string(),
            "vendor_id": format!("{:#06x}", d.vendor_id),
            "product_id": format!("{:#06x}", d.product_id),
            "address": d.address,
        });
        println!("{line}");
    }
    ExitCode::SUCCESS
}
