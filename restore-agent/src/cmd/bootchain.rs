//! `restore-agent bootchain`: wait for a Mac in DFU, then walk it through iBSS and iBEC to
//! `bootx` with already-personalized images, printing progress to stderr.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use restore_agent::bootchain::driver::{self, IdentityReader};
use restore_agent::bootchain::{
    Driver, DriverOptions, Outcome, PersonalizedDir, Progress, Stage, Timeouts,
};
use restore_agent::identity::{self, report::hex_ecid};
use restore_agent::manifest::{BuildManifest, RestoreBehavior};
use restore_agent::usb::rusb_edge::RusbBus;
use restore_agent::usb::UsbBus;

use super::identify::mode_label;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// BuildManifest.plist of the IPSW to boot.
    #[arg(long)]
    pub manifest: PathBuf,
    /// Directory of personalized images, one `<component>.img4` per manifest component
    /// (e.g. `iBSS.img4`, `Ap,LocalPolicy.img4`).
    #[arg(long)]
    pub images: PathBuf,
    /// Use the Erase build identity (default: Update).
    #[arg(long)]
    pub erase: bool,
    /// Only this Mac (ECID in hex, with or without 0x).
    #[arg(long, value_parser = parse_ecid)]
    pub ecid: Option<u64>,
    /// Accept a Mac that is in Recovery instead of DFU.
    #[arg(long)]
    pub allow_recovery: bool,
    /// Seconds to wait for a Mac in DFU to appear.
    #[arg(long, default_value_t = 10)]
    pub wait: u64,
    /// Seconds to wait after `bootx` for the restore-mode device (0: do not wait).
    #[arg(long, default_value_t = 300)]
    pub restore_timeout: u64,
}

fn parse_ecid(s: &str) -> Result<u64, String> {
    let hex = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    u64::from_str_radix(hex, 16).map_err(|e| format!("not a hexadecimal ECID ({s}): {e}"))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let bus = RusbBus::new().context("cannot access USB")?;
    let stderr = std::io::stderr();
    run_on(
        &bus,
        &args,
        identity::read_identity,
        Timeouts::default(),
        &mut stderr.lock(),
    )
}

/// The whole command against any bus (tests pass a fake one).
pub fn run_on(
    bus: &dyn UsbBus,
    args: &Args,
    read_identity: IdentityReader,
    mut timeouts: Timeouts,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let manifest = BuildManifest::from_path(&args.manifest)?;
    let mut images = PersonalizedDir::new(&args.images);
    timeouts.discovery = Duration::from_secs(args.wait);
    if args.restore_timeout > 0 {
        timeouts.restore_mode = Duration::from_secs(args.restore_timeout);
    }
    writeln!(
        out,
        "bootchain: waiting up to {} s for a Mac in DFU{}…",
        args.wait,
        args.ecid
            .map(|e| format!(" with ECID {}", hex_ecid(e)))
            .unwrap_or_default()
    )?;
    let device = driver::wait_for_device(bus, args.ecid, timeouts.discovery, read_identity)?;
    let options = DriverOptions {
        behavior: if args.erase {
            RestoreBehavior::Erase
        } else {
            RestoreBehavior::Update
        },
        allow_recovery_start: args.allow_recovery,
        wait_for_restore: args.restore_timeout > 0,
        timeouts,
        read_identity,
    };
    let result = {
        let mut report = |p: &Progress| {
            if let Some(line) = progress_line(p) {
                // Progress is best-effort output; a closed stderr must not abort a boot.
                let _ = writeln!(out, "{line}");
            }
        };
        Driver::new(bus, &mut images, &mut report, options).run(&device, &manifest)
    };
    let outcome = result?;
    for line in final_lines(&outcome) {
        writeln!(out, "{line}")?;
    }
    Ok(())
}

fn ecid_text(ecid: Option<u64>) -> String {
    ecid.map(hex_ecid)
        .unwrap_or_else(|| "(ECID unknown)".into())
}

/// One stderr line per progress event worth a technician's attention.
pub fn progress_line(p: &Progress) -> Option<String> {
    Some(match p {
        Progress::Found {
            ecid,
            board,
            mode,
            variant,
        } => format!(
            "bootchain: found Mac {} ({board}) in {}; build identity \"{variant}\"",
            ecid_text(*ecid),
            mode_label(*mode)
        ),
        Progress::Stage(Stage::Dfu) => "bootchain: DFU: sending iBSS".into(),
        Progress::Stage(s) => format!("bootchain: {s}"),
        Progress::Upload {
            component,
            sent,
            total,
        } if sent == total => format!("bootchain: sent {component} ({total} bytes)"),
        Progress::Upload { .. } => return None,
        Progress::Command(_) | Progress::Env { .. } => return None,
        Progress::Waiting(what) => format!("bootchain: waiting for {what}"),
        Progress::Reconnected { mode, product_id } => format!(
            "bootchain: the Mac is back in {} (05ac:{product_id:04x})",
            mode_label(*mode)
        ),
        Progress::ApNonceChanged => "bootchain: the Mac's ApNonce changed".into(),
        Progress::BootxSent => return None,
        Progress::RestoreMode { .. } => return None,
    })
}

/// The closing lines: bootx sent, and restore mode reached when it was.
pub fn final_lines(outcome: &Outcome) -> Vec<String> {
    let ecid = ecid_text(outcome.ecid);
    let mut v = vec![format!(
        "bootchain: bootx sent; Mac {ecid} is booting the restore ramdisk"
    )];
    if let Some(d) = &outcome.restore_device {
        v.push(format!(
            "bootchain: Mac {ecid} reached restore mode (05ac:{:04x})",
            d.product_id
        ));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use restore_agent::usb::{DeviceInfo, UsbLocation};

    #[test]
    fn ecid_parsing() {
        assert_eq!(parse_ecid("0x1C2B3A4D5E6F70"), Ok(0x1C2B3A4D5E6F70));
        assert_eq!(parse_ecid("001c2b3a4d5e6f70"), Ok(0x1C2B3A4D5E6F70));
        assert!(parse_ecid("xyz").is_err());
        assert!(parse_ecid("").is_err());
    }

    #[test]
    fn closing_lines() {
        let mut o = Outcome {
            ecid: Some(0x1C2B3A4D5E6F70),
            board: "j274ap".into(),
            variant: "Customer Software Update".into(),
            restore_device: None,
        };
        assert_eq!(
            final_lines(&o),
            vec!["bootchain: bootx sent; Mac 0x001c2b3a4d5e6f70 is booting the restore ramdisk"]
        );
        o.restore_device = Some(DeviceInfo {
            location: UsbLocation {
                bus: 1,
                ports: vec![2],
            },
            address: 9,
            vendor_id: 0x05ac,
            product_id: 0x1901,
        });
        assert_eq!(
            final_lines(&o)[1],
            "bootchain: Mac 0x001c2b3a4d5e6f70 reached restore mode (05ac:1901)"
        );
    }

    #[test]
    fn progress_lines() {
        assert_eq!(
            progress_line(&Progress::Upload {
                component: "iBEC".into(),
                sent: 10,
                total: 10
            })
            .as_deref(),
            Some("bootchain: sent iBEC (10 bytes)")
        );
        assert_eq!(
            progress_line(&Progress::Upload {
                component: "iBEC".into(),
                sent: 1,
                total: 10
            }),
            None
        );
    }
}
