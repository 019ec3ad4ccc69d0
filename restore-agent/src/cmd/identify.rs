//! `restore-agent identify`: decode a serial string (as copied from `lsusb -v`, System
//! Information or a log) without a device attached.

use std::io::Write;

use anyhow::bail;
use restore_agent::identity::{AppleMode, DeviceIdentity};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    /// SecureROM DFU (05ac:1227).
    Dfu,
    /// USB-C port controller DFU (05ac:f014): BDID packs the Mac's CPID and BDID.
    Portdfu,
    /// iBoot Recovery (05ac:1280-1283).
    Recovery,
}

impl From<ModeArg> for AppleMode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Dfu => AppleMode::Dfu,
            ModeArg::Portdfu => AppleMode::PortDfu,
            ModeArg::Recovery => AppleMode::Recovery,
        }
    }
}

#[derive(clap::Args)]
pub struct Args {
    /// The USB serial string, e.g. "CPID:8103 CPRV:11 … BDID:26 ECID:… SRTG:[iBoot-…]".
    #[arg(long)]
    pub serial: String,
    /// String descriptor 1 (where the device prints NONC:/SNON:), if you have it.
    #[arg(long)]
    pub nonce_string: Option<String>,
    /// The USB mode the string came from (needed for Port DFU, whose BDID is packed).
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    /// Print JSON instead of a summary.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let id = DeviceIdentity::from_strings(
        args.mode.map(AppleMode::from),
        &args.serial,
        args.nonce_string.as_deref(),
    );
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &id.report())?;
        writeln!(out)?;
    } else {
        write_summary(&mut out, &id)?;
    }
    out.flush()?;
    // The situation (what and why) is already printed; the error only sets the exit status.
    if !id.situation().is_known_mac() {
        bail!("not an Apple Silicon Mac that macrescue knows (see above)");
    }
    Ok(())
}

/// Human-readable, one field per line; unknown fields are left out.
pub fn write_summary(out: &mut dyn Write, id: &DeviceIdentity) -> std::io::Result<()> {
    let r = id.report();
    let mut field = |label: &str, value: Option<&str>| -> std::io::Result<()> {
        match value {
            Some(v) => writeln!(out, "{label:<13} {v}"),
            None => Ok(()),
        }
    };
    let mode = id.mode.map(mode_label);
    field("Mode:", mode)?;
    field("Model:", r.name)?;
    field("Product type:", r.product_type)?;
    field("Board config:", r.board_config)?;
    field("Kind:", r.kind)?;
    field("CPID:", r.cpid.as_deref())?;
    field("BDID:", r.bdid.as_deref())?;
    field("ECID:", r.ecid.as_deref())?;
    field("CPRV:", r.cprv.as_deref())?;
    field("CPFM:", r.cpfm.as_deref())?;
    field("SCEP:", r.scep.as_deref())?;
    field("IBFL:", r.ibfl.as_deref())?;
    field("SDOM:", r.sdom.as_deref())?;
    field("PREV:", r.prev.as_deref())?;
    field("SRTG:", r.srtg.as_deref())?;
    field("SRNM:", r.srnm.as_deref())?;
    field("ApNonce:", r.ap_nonce.as_deref())?;
    field("ApNonce TSS:", r.ap_nonce_tss.as_deref())?;
    field("SepNonce:", r.sep_nonce.as_deref())?;
    writeln!(out, "{}", r.message)
}

/// Short mode names for human output (JSON uses the serde names).
pub fn mode_label(mode: AppleMode) -> &'static str {
    match mode {
        AppleMode::Dfu => "DFU",
        AppleMode::PortDfu => "Port DFU",
        AppleMode::Recovery => "Recovery",
        AppleMode::Restore => "Restore",
        AppleMode::Wtf => "WTF",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_a_mac() {
        let id = DeviceIdentity::from_strings(
            Some(AppleMode::Dfu),
            "CPID:8103 CPRV:11 BDID:26 ECID:0005681C34D3001E SRTG:[iBoot-4479]",
            Some("NONC:0a0b"),
        );
        let mut out = Vec::new();
        write_summary(&mut out, &id).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "Mode:         DFU\n\
             Model:        MacBook Air (M1, 2020)\n\
             Product type: MacBookAir10,1\n\
             Board config: j313ap\n\
             Kind:         apple_silicon_mac\n\
             CPID:         0x8103\n\
             BDID:         0x26\n\
             ECID:         0x0005681c34d3001e\n\
             CPRV:         0x11\n\
             SRTG:         iBoot-4479\n\
             ApNonce:      0a0b\n\
             MacBook Air (M1, 2020) [MacBookAir10,1, j313ap] is in DFU mode: ready\n"
        );
    }
}
