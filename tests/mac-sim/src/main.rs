//! `mac-sim`: list simulated boards, show a mode's descriptors, serve simulated Macs over
//! USB/IP, write a matching boot chain.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use mac_sim::board::Board;
use mac_sim::descriptors::{Descriptors, UsbMode};
use mac_sim::device::{SimMac, Timing};
use mac_sim::faults::{Faults, StartMode};
use mac_sim::wire::SimDevice;

mod world;

/// How `world` builds each Mac's restore OS (the same reporting factory `usbip` uses).
type RestoreFactoryFn = fn(
    mac_sim::restore::scenario::Scenario,
    mac_sim::restore::RestoreConfig,
    u64,
) -> mac_sim::device::RestoreFactory;

#[derive(Parser)]
#[command(
    name = "mac-sim",
    about = "A simulated Apple Silicon Mac (DFU, Port DFU, iBoot)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Dfu,
    Portdfu,
    Recovery,
    /// Already in restore mode (needs --scenario).
    Restore,
}

impl From<Mode> for StartMode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Dfu => StartMode::Dfu,
            Mode::Portdfu => StartMode::PortDfu,
            Mode::Recovery => StartMode::Recovery,
            Mode::Restore => StartMode::Restore,
        }
    }
}

const DEFAULT_ECID: &str = "001C2B3A4D5E6F70";

/// A restore factory that also reports, on stderr, how each restore-mode boot ended (the
/// USB/IP server runs until killed, so this is how a VM demo learns the result).
fn restore_factory(
    scenario: mac_sim::restore::scenario::Scenario,
    cfg: mac_sim::restore::RestoreConfig,
    ecid: u64,
) -> mac_sim::device::RestoreFactory {
    let latest = std::sync::Arc::new(std::sync::Mutex::new(None));
    let mut inner = mac_sim::restore::RestoreOs::factory(scenario, cfg, latest.clone());
    Box::new(move |board, id| {
        let os = inner(board, id);
        let handle = os.handle();
        std::thread::spawn(move || {
            let outcome = loop {
                let o = handle.wait(std::time::Duration::from_secs(3600));
                if o != mac_sim::restore::restored::Outcome::Running {
                    break o;
                }
            };
            eprintln!(
                "mac-sim {ecid:016X}: restore scenario ended: {outcome:?}; usbmux violations: {}",
                handle.violations().total()
            );
        });
        os
    })
}

#[derive(Subcommand)]
enum Cmd {
    /// List the boards with a fixture BuildManifest.
    Boards,
    /// Print the descriptors and identity strings of a board in one mode.
    Describe {
        #[arg(long)]
        board: String,
        #[arg(long, value_enum, default_value = "dfu")]
        mode: Mode,
        #[arg(long, default_value = DEFAULT_ECID)]
        ecid: String,
    },
    /// Export simulated Macs over USB/IP.
    Usbip {
        #[arg(long)]
        board: String,
        /// ECID in hex; with --count N the Macs get ECID, ECID+1, …
        #[arg(long, default_value = DEFAULT_ECID)]
        ecid: String,
        #[arg(long, value_enum, default_value = "dfu")]
        start: Mode,
        /// key[=value], repeatable, e.g. disconnect-at=stage1, disconnect-after-bytes=100000.
        #[arg(long = "fault")]
        faults: Vec<String>,
        #[arg(long, default_value = "127.0.0.1:3240")]
        listen: SocketAddr,
        /// Also attach the exported devices to this machine's vhci-hcd.
        #[arg(long)]
        attach: bool,
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Short reboot delays (tens of milliseconds) instead of near-real ones.
        #[arg(long)]
        fast: bool,
        /// Restore-mode behaviour after `bootx` (or with --start restore): play this scenario
        /// file (see tests/mac-sim/README.md). Without it the restore-mode Mac only NAKs.
        #[arg(long, value_name = "FILE")]
        scenario: Option<PathBuf>,
        /// How long the simulated restore OS waits for the host at any one point (seconds).
        #[arg(long, default_value_t = 60, requires = "scenario")]
        restore_timeout: u64,
    },
    /// Serve files like Apple's firmware CDN (ranges, per-connection rate limit, faults).
    Cdn(CdnArgs),
    /// Write a boot chain (iBSS, iBEC, … as the simulated iBoot accepts them) for a board.
    MakeBootchain {
        #[arg(long)]
        board: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Serve a simulated TSS that signs tickets with the test key the simulated Mac trusts:
    /// AP, local-policy and recoveryOS tickets, and the firmware-updater tickets of retimers
    /// (Timer), the TCON (Baobab), BMU and Rose (Rap).
    Tss {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// BuildManifest(s) whose builds the server knows; repeatable.
        #[arg(long = "manifest", required = true)]
        manifests: Vec<PathBuf>,
        /// Builds still signed (ProductBuildVersion); repeatable. Default: every known build.
        #[arg(long = "signed-build")]
        signed_builds: Vec<String>,
        /// ECIDs (hex) allowed; repeatable. Default: any.
        #[arg(long = "allow-ecid")]
        allow_ecids: Vec<String>,
        /// Serve HTTPS with a test CA generated now.
        #[arg(long)]
        tls: bool,
        /// Where to write the test CA's PEM (with --tls).
        #[arg(long, requires = "tls")]
        ca_out: Option<PathBuf>,
        /// Fault: drop the connection of the first N requests without an answer.
        #[arg(long, default_value_t = 0)]
        drop_first: u32,
        /// Fault: answer every request with STATUS=94 (not eligible).
        #[arg(long)]
        always_94: bool,
        /// Fault: answer every request with HTTP 500.
        #[arg(long)]
        http_500: bool,
    },
    /// Write a synthetic IPSW: real ZIP layout, the board's BuildManifest, IM4P components and
    /// a generated OS image.
    MakeIpsw {
        #[arg(long)]
        board: String,
        #[arg(long)]
        out: PathBuf,
        /// Size of the OS image in bytes.
        #[arg(long, default_value_t = 16 << 20)]
        os_size: u64,
        /// Deflate the OS image (default: stored, as recent IPSWs).
        #[arg(long)]
        deflate_os: bool,
        /// Use this BuildManifest instead of the board's fixture.
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// Write ZIP64 records even when no value needs them.
        #[arg(long)]
        force_zip64: bool,
        /// Make the OS image mostly zeros written as holes (multi-GiB IPSWs on little disk).
        #[arg(long)]
        sparse_os: bool,
    },
    /// Serve a simulated firmware catalog (Apple mesu XML + ipsw.me v4 JSON) until killed.
    Catalog(mac_sim::services::catalog::CliArgs),
    /// Everything a station reaches: a synthetic IPSW on a CDN, catalog and TSS (one test CA
    /// whose certificate also names --public-host), and simulated Macs over USB/IP playing a
    /// restore scenario that expects that IPSW. Writes DIR/world.json; runs until killed.
    World(world::WorldArgs),
}

#[derive(clap::Args)]
struct CdnArgs {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Serve every file in this directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// NAME:SIZE[:SEED] — a generated file (SIZE accepts K/M/G), repeatable.
    #[arg(long)]
    generate: Vec<String>,
    /// Per-connection limit in bytes per second (K/M/G suffixes).
    #[arg(long)]
    rate: Option<String>,
    /// drop-at=OFFSET[:TIMES], drop-every=N:AFTER, stall-at=OFFSET[:MS|forever[:TIMES]],
    /// wrong-bytes=OFFSET:LEN, html200, html200-every=N, 503=COUNT, slow=NTH:RATE.
    #[arg(long = "fault")]
    faults: Vec<String>,
    /// Serve HTTPS with a freshly generated test CA.
    #[arg(long)]
    tls: bool,
    /// Write the test CA certificate (PEM) here (with --tls).
    #[arg(long)]
    ca_out: Option<PathBuf>,
}

fn run_cdn(a: CdnArgs) -> Result<()> {
    use mac_sim::services::cdn::{parse_size, Cdn, CdnConfig, CdnFile, Fault};
    let mut config = CdnConfig::default();
    if let Some(dir) = &a.dir {
        config
            .add_dir(dir)
            .with_context(|| format!("cannot list {}", dir.display()))?;
    }
    for g in &a.generate {
        let mut parts = g.split(':');
        let (Some(name), Some(size)) = (parts.next(), parts.next()) else {
            bail!("--generate {g:?}: expected NAME:SIZE[:SEED]");
        };
        let size = parse_size(size).with_context(|| format!("--generate {g:?}: bad size"))?;
        let seed = match parts.next() {
            Some(s) => s
                .parse()
                .with_context(|| format!("--generate {g:?}: bad seed"))?,
            None => 1,
        };
        config.files.push(CdnFile::generated(name, size, seed));
    }
    if config.files.is_empty() {
        bail!("nothing to serve: give --dir or --generate");
    }
    config.rate = match &a.rate {
        Some(r) => Some(parse_size(r).with_context(|| format!("--rate {r:?} is not a size"))?),
        None => None,
    };
    config.faults = a
        .faults
        .iter()
        .map(|f| Fault::parse(f))
        .collect::<Result<_, _>>()?;
    let tls = if a.tls {
        let pki = mac_sim::services::pki::TestPki::generate(&[])?;
        if let Some(out) = &a.ca_out {
            std::fs::write(out, &pki.ca_pem)
                .with_context(|| format!("cannot write {}", out.display()))?;
        }
        Some(pki.server_config)
    } else {
        None
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let files: Vec<String> = config.files.iter().map(|f| f.name.clone()).collect();
        let cdn = Cdn::start(a.listen, tls, config).await?;
        for f in files {
            println!("{}", cdn.url(&f));
        }
        use std::io::Write;
        std::io::stdout().flush()?;
        std::future::pending::<Result<()>>().await
    })
}

fn parse_ecid(s: &str) -> Result<u64> {
    let h = s.trim().trim_start_matches("0x").trim_start_matches("0X");
    u64::from_str_radix(h, 16).with_context(|| format!("--ecid {s:?} is not a hex number"))
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: serial consoles and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().cmd {
        Cmd::Boards => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            for b in Board::fixture_boards()? {
                let board = Board::load(&b)?;
                let line = writeln!(
                    out,
                    "{:<14} CPID:{:04X} BDID:{:02X}",
                    board.board_config, board.cpid, board.bdid
                );
                // `mac-sim boards | head`: a reader that has seen enough is not an error.
                match line {
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                    other => other?,
                }
            }
        }
        Cmd::Describe { board, mode, ecid } => {
            let board = Board::load(&board)?;
            let mac = SimMac::new(
                board,
                parse_ecid(&ecid)?,
                mode.into(),
                Faults::default(),
                Timing::default(),
            );
            print_descriptors(mac.descriptors());
        }
        Cmd::Usbip {
            board,
            ecid,
            start,
            faults,
            listen,
            attach,
            count,
            fast,
            scenario,
            restore_timeout,
        } => {
            if count == 0 {
                bail!("--count must be at least 1");
            }
            if matches!(start, Mode::Restore) && scenario.is_none() {
                bail!("--start restore needs --scenario FILE: a restore-mode Mac plays a scenario");
            }
            let scenario = scenario
                .map(|p| {
                    mac_sim::restore::scenario::Scenario::load(&p)
                        .with_context(|| format!("cannot load the scenario {}", p.display()))
                })
                .transpose()?;
            let board = Board::load(&board)?;
            let faults = Faults::from_specs(&faults)?;
            let ecid = parse_ecid(&ecid)?;
            let timing = if fast {
                Timing::fast()
            } else {
                Timing::default()
            };
            let restore_cfg = mac_sim::restore::RestoreConfig {
                timeout: std::time::Duration::from_secs(restore_timeout),
                ..Default::default()
            };
            let devices: Vec<Box<dyn SimDevice>> = (0..u64::from(count))
                .map(|i| {
                    let mac = SimMac::new(
                        board.clone(),
                        ecid.wrapping_add(i),
                        start.into(),
                        faults.clone(),
                        timing,
                    );
                    let mac = match &scenario {
                        Some(sc) => mac.with_restore(restore_factory(
                            sc.clone(),
                            restore_cfg.clone(),
                            ecid.wrapping_add(i),
                        )),
                        None => mac,
                    };
                    Box::new(mac) as Box<dyn SimDevice>
                })
                .collect();
            mac_sim::usbip::serve(devices, mac_sim::usbip::ExportOptions::new(listen, attach))
                .context("USB/IP server failed")?;
        }
        Cmd::Cdn(a) => run_cdn(a)?,
        Cmd::MakeBootchain { board, out } => {
            let board = Board::load(&board)?;
            let paths = mac_sim::images::write_bootchain(&board, &out)
                .with_context(|| format!("cannot write the boot chain to {}", out.display()))?;
            for p in paths {
                println!("{}", p.display());
            }
        }
        Cmd::Tss {
            listen,
            manifests,
            signed_builds,
            allow_ecids,
            tls,
            ca_out,
            drop_first,
            always_94,
            http_500,
        } => {
            let faults = mac_sim::services::tss::TssFaults::default();
            faults.drop_next.store(drop_first, Ordering::Relaxed);
            faults.always_94.store(always_94, Ordering::Relaxed);
            faults.http_500.store(http_500, Ordering::Relaxed);
            serve_tss(
                listen,
                &manifests,
                (signed_builds, allow_ecids),
                tls,
                ca_out,
                faults,
            )?
        }
        Cmd::MakeIpsw {
            board,
            out,
            os_size,
            deflate_os,
            manifest,
            force_zip64,
            sparse_os,
        } => {
            let mut opts = mac_sim::ipsw::IpswOptions::new(&board);
            opts.os_size = os_size;
            opts.deflate_os = deflate_os;
            opts.manifest = manifest;
            opts.force_zip64 = force_zip64;
            opts.sparse_os = sparse_os;
            let summary = mac_sim::ipsw::make_ipsw(&opts, &out)
                .with_context(|| format!("cannot write the IPSW {}", out.display()))?;
            println!(
                "{}: {} entries, OS image {}",
                out.display(),
                summary.entries.len(),
                summary.os_paths.join(", ")
            );
        }
        Cmd::World(a) => world::run(a, restore_factory)?,
        Cmd::Catalog(args) => mac_sim::services::catalog::run_cli(args, |mesu, ipsw_me| {
            // Scripts read these two lines to find the ephemeral port.
            println!("mesu: {mesu}");
            println!("ipsw.me: {ipsw_me}");
        })
        .context("catalog server failed")?,
    }
    Ok(())
}

fn serve_tss(
    listen: SocketAddr,
    manifests: &[PathBuf],
    (signed_builds, allow_ecids): (Vec<String>, Vec<String>),
    tls: bool,
    ca_out: Option<PathBuf>,
    faults: mac_sim::services::tss::TssFaults,
) -> Result<()> {
    use mac_sim::services::tss::{TssConfig, TssService};
    let mut config = TssConfig::from_files(manifests)?;
    if !signed_builds.is_empty() {
        config.signed_builds = Some(signed_builds.into_iter().collect());
    }
    if !allow_ecids.is_empty() {
        config.ecid_allow = Some(
            allow_ecids
                .iter()
                .map(|e| parse_ecid(e))
                .collect::<Result<_>>()?,
        );
    }
    let tls_config = if tls {
        let pki = mac_sim::services::pki::TestPki::generate(&[])?;
        if let Some(p) = &ca_out {
            std::fs::write(p, &pki.ca_pem)
                .with_context(|| format!("cannot write the CA to {}", p.display()))?;
        }
        Some(pki.server_config)
    } else {
        None
    };
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async move {
        let mut svc = TssService::new(config);
        svc.faults = faults;
        let svc = std::sync::Arc::new(svc);
        let server = svc
            .start(listen, tls_config)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        // The URL on stdout lets scripts find the port chosen for 127.0.0.1:0.
        println!("{}/TSS/controller?action=2", server.url());
        use std::io::Write as _;
        std::io::stdout().flush()?;
        tokio::signal::ctrl_c().await?;
        tracing::info!("TSS served {} requests", svc.requests());
        Ok(())
    })
}

fn print_descriptors(d: &Descriptors) {
    let e = d.enumeration();
    let mode = match d.mode {
        UsbMode::Dfu => "DFU".to_string(),
        UsbMode::PortDfu => "Port DFU".to_string(),
        UsbMode::Recovery(s) => format!("Recovery (boot-stage {s})"),
        UsbMode::Restore => "Restore".to_string(),
    };
    println!("{:04x}:{:04x} {mode}", e.vendor_id, e.product_id);
    println!("device descriptor: {}", hex::encode(&d.device));
    println!("configuration 1:   {}", hex::encode(&d.configuration));
    for (i, s) in &d.strings {
        println!("string {i}: {s}");
    }
}
