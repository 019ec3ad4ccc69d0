//! `mac-sim world`: everything a station needs from the outside, on one host and one test CA —
//! a synthetic IPSW on a simulated firmware CDN, the catalog naming it, the TSS signing for it,
//! and simulated Macs on a USB/IP server whose restore scenario expects exactly that IPSW's
//! OS image. `ci/demo` runs it on 127.0.0.1 and forwards the ports into a QEMU guest, where
//! the services are reached as `https://<public-host>:<port>` (an IP SAN in the certificate).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use sha1::Digest;

use mac_sim::board::Board;
use mac_sim::device::{SimMac, Timing};
use mac_sim::faults::Faults;
use mac_sim::ipsw::{make_ipsw, IpswOptions};
use mac_sim::restore::scenario::{Scenario, Step};
use mac_sim::services::catalog::{mesu_url, CatalogBuild, CatalogService};
use mac_sim::services::cdn::{Cdn, CdnConfig};
use mac_sim::services::pki::TestPki;
use mac_sim::services::tss::{TssConfig, TssService};
use mac_sim::wire::SimDevice;

#[derive(clap::Args)]
pub struct WorldArgs {
    #[arg(long, default_value = "j274ap")]
    pub board: String,
    /// Working directory: the IPSW, the OS image, the CA and `world.json` go here.
    #[arg(long)]
    pub dir: PathBuf,
    /// Size of the IPSW's OS image in bytes.
    #[arg(long, default_value_t = 64 << 20)]
    pub os_size: u64,
    /// Restore scenario the Macs play in restore mode; repeatable: successive restore-mode
    /// boots play them in order (the last one repeats).
    #[arg(long, required = true)]
    pub scenario: Vec<PathBuf>,
    /// The first restore-mode boot ends with this restored status instead of the scenario's
    /// own (27: the Data volume cannot be mounted — a failure an erase fixes).
    #[arg(long)]
    pub first_status: Option<u64>,
    /// Address the services listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub listen: IpAddr,
    /// Host name or IP the station uses for the services (URLs and certificate SAN).
    #[arg(long, default_value = "127.0.0.1")]
    pub public_host: String,
    /// Ports: catalog, CDN, TSS (HTTPS), TSS (plain HTTP, for the Mac's own requests through
    /// the reverse proxy), USB/IP. 0 picks any.
    #[arg(long, value_delimiter = ',', default_value = "0,0,0,0,3240")]
    pub ports: Vec<u16>,
    /// Simulated Macs on the USB/IP server (ECID, ECID+1, …).
    #[arg(long, default_value_t = 1)]
    pub count: u32,
    #[arg(long, default_value = "001C2B3A4D5E6F70")]
    pub ecid: String,
    /// dfu, portdfu or recovery.
    #[arg(long, default_value = "dfu")]
    pub start: String,
    /// Fault knobs of the Macs (see `mac-sim usbip --help`).
    #[arg(long = "fault")]
    pub faults: Vec<String>,
    /// Short reboot delays.
    #[arg(long)]
    pub fast: bool,
    /// How long the simulated restore OS waits for the host at any one point (seconds).
    #[arg(long, default_value_t = 120)]
    pub restore_timeout: u64,
}

pub fn run(a: WorldArgs, factory: super::RestoreFactoryFn) -> Result<()> {
    if a.ports.len() != 5 {
        bail!("--ports needs five numbers: catalog,cdn,tss,tss-plain,usbip");
    }
    let board = Board::load(&a.board)?;
    std::fs::create_dir_all(a.dir.join("cdn"))
        .with_context(|| format!("cannot create {}", a.dir.display()))?;

    let mut opts = IpswOptions::new(&a.board);
    opts.os_size = a.os_size;
    opts.mac_identities = true;
    opts.bootability_bundle = true;
    let probe = make_ipsw(&opts, &a.dir.join("probe.ipsw"))?;
    let version = str_of(&probe.manifest, "ProductVersion");
    let build = str_of(&probe.manifest, "ProductBuildVersion");
    // Preflight manifests list every Mac the build supports; the catalog offers it to each.
    let products: Vec<String> = probe
        .manifest
        .get("SupportedProductTypes")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_string().map(str::to_string))
        .collect();
    let name = format!("UniversalMac_{version}_{build}_Restore.ipsw");
    let ipsw = a.dir.join("cdn").join(&name);
    std::fs::rename(a.dir.join("probe.ipsw"), &ipsw)?;
    let sha1 = hex::encode(sha1::Sha1::digest(std::fs::read(&ipsw)?));

    // The image the simulated ASR sink compares against: the generator make_ipsw used.
    let os_image = a.dir.join("os.img");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&os_image)?);
        let mut buf = vec![0u8; mac_sim::ipsw::OS_BLOCK as usize];
        let mut off = 0u64;
        while off < a.os_size {
            let n = (a.os_size - off).min(buf.len() as u64) as usize;
            let _ = mac_sim::ipsw::os_fill(off, &mut buf[..n], false);
            f.write_all(&buf[..n])?;
            off += n as u64;
        }
        f.flush()?;
    }

    let pki = TestPki::generate(&[a.public_host.as_str()])?;
    let ca = a.dir.join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem)?;
    let at = |i: usize| SocketAddr::new(a.listen, a.ports[i]);
    let public = |port: u16, tls: bool| {
        format!(
            "{}://{}:{port}",
            if tls { "https" } else { "http" },
            a.public_host
        )
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let tls = Some(pki.server_config.clone());
    let (cdn, tss_https, tss_plain, catalog, tss_svc) = rt.block_on(async {
        let mut cfg = CdnConfig::default();
        cfg.add_dir(&a.dir.join("cdn"))?;
        let cdn = Cdn::start(at(1), tls.clone(), cfg).await?;
        let cdn_port = port_of(&cdn.url(&name));
        let svc = Arc::new(TssService::new(TssConfig {
            manifests: vec![probe.manifest.clone()],
            ..TssConfig::default()
        }));
        let tss_https = svc.start(at(2), tls.clone()).await?;
        let tss_plain = svc.start(at(3), None).await?;
        let catalog = CatalogService::from_builds(
            products
                .iter()
                .map(|p| CatalogBuild {
                    product_type: p.clone(),
                    version: version.clone(),
                    build: build.clone(),
                    url: format!("{}/{name}", public(cdn_port, true)),
                    sha1: Some(sha1.clone()),
                })
                .collect(),
        );
        let catalog = catalog.start(at(0), tls.clone()).await?;
        anyhow::Ok((cdn_port, tss_https, tss_plain, catalog, svc))
    })?;
    let catalog_base = public(catalog.addr.port(), true);
    let catalog_url = mesu_url(&catalog).replace(&catalog.url(), &catalog_base);
    let tss_url = format!(
        "{}/TSS/controller?action=2",
        public(tss_https.addr.port(), true)
    );
    let tss_plain_base = public(tss_plain.addr.port(), false);

    // The shipped scenarios, pointed at this world: the image is the IPSW's OS image, the URLs
    // the Mac fetches through the reverse proxy go to the plain-HTTP TSS.
    let mut scenarios = Vec::new();
    for path in &a.scenario {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .replace("http://gs.apple.com/", &format!("{tss_plain_base}/"));
        let mut scenario = Scenario::parse(&text, path)?;
        scenario.image.size = a.os_size;
        scenario.image.seed = None;
        scenario.image.sha1 = None;
        scenario.image.path = Some(os_image.clone());
        scenarios.push(scenario);
    }
    if let Some(status) = a.first_status {
        let first = &mut scenarios[0];
        if let Some(last) = first
            .steps
            .iter()
            .rposition(|st| matches!(st, Step::StatusMsg { .. }))
        {
            first.steps.truncate(last);
        }
        first.steps.push(Step::StatusMsg {
            status,
            log: Some("mount_filesystems: failed to mount the Data volume (APFS error 49)".into()),
            amr_error: None,
        });
    }
    let faults = Faults::from_specs(&a.faults)?;
    let start = match a.start.as_str() {
        "dfu" => mac_sim::faults::StartMode::Dfu,
        "portdfu" => mac_sim::faults::StartMode::PortDfu,
        "recovery" => mac_sim::faults::StartMode::Recovery,
        other => bail!("--start {other}: expected dfu, portdfu or recovery"),
    };
    let ecid = super::parse_ecid(&a.ecid)?;
    let timing = if a.fast {
        Timing::fast()
    } else {
        Timing::default()
    };
    let restore_cfg = mac_sim::restore::RestoreConfig {
        timeout: std::time::Duration::from_secs(a.restore_timeout),
        ..Default::default()
    };
    let devices: Vec<Box<dyn SimDevice>> = (0..u64::from(a.count))
        .map(|i| {
            let e = ecid.wrapping_add(i);
            let mut boots: Vec<mac_sim::device::RestoreFactory> = scenarios
                .iter()
                .map(|sc| factory(sc.clone(), restore_cfg.clone(), e))
                .collect();
            let mut boot = 0usize;
            let mac = SimMac::new(board.clone(), e, start, faults.clone(), timing).with_restore(
                Box::new(move |board, id| {
                    let i = boot.min(boots.len() - 1);
                    boot += 1;
                    (boots[i])(board, id)
                }),
            );
            Box::new(mac) as Box<dyn SimDevice>
        })
        .collect();
    let server =
        mac_sim::usbip::Server::bind(devices, mac_sim::usbip::ExportOptions::new(at(4), false))
            .with_context(|| format!("cannot listen for USB/IP on {}", at(4)))?;
    let usbip = server.local_addr()?;

    let world = serde_json::json!({
        "catalog_url": catalog_url,
        "ipsw_me_url": catalog_base,
        "tss_url": tss_url,
        "ipsw_url": format!("{}/{name}", public(cdn, true)),
        "ipsw_sha1": sha1,
        "ca_file": ca,
        "usbip": format!("{}:{}", a.public_host, usbip.port()),
        "board": board.board_config,
        "build": build,
        "ports": {
            "catalog": catalog.addr.port(),
            "cdn": cdn,
            "tss": tss_https.addr.port(),
            "tss_plain": tss_plain.addr.port(),
            "usbip": usbip.port(),
        },
    });
    std::fs::write(a.dir.join("world.json"), serde_json::to_vec_pretty(&world)?)?;
    // Scripts wait for this line (everything is listening by now).
    println!("world ready: {world}");
    use std::io::Write as _;
    std::io::stdout().flush()?;
    let served = std::thread::spawn(move || server.run());
    let r = served.join();
    tracing::info!("TSS served {} requests", tss_svc.requests());
    drop((rt, catalog, tss_https, tss_plain));
    match r {
        Ok(r) => r.context("USB/IP server failed"),
        Err(_) => bail!("the USB/IP server thread panicked"),
    }
}

fn str_of(m: &plist::Dictionary, k: &str) -> String {
    m.get(k)
        .and_then(|v| v.as_string())
        .unwrap_or("")
        .to_string()
}

/// The port of `scheme://host:port/…` (0 if there is none).
fn port_of(url: &str) -> u16 {
    url.split("://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .and_then(|hp| hp.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}
