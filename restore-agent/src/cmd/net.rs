//! `restore-agent net`: bring up networking as the rescue image does (links, DHCP, SLAAC,
//! resolv.conf, SNTP clock) and print the status as JSON lines whenever it changes. The
//! station runs the same code in-process; this command is for bring-up and diagnosis.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use restore_agent::net::{self, ClockSetter, DryRunClock, NetConfig, SystemClock};

#[derive(clap::Args)]
pub struct Args {
    /// Manage only this link (repeatable); default: every wired link.
    #[arg(long = "interface")]
    pub interfaces: Vec<String>,
    /// Where to write the DNS servers from DHCP.
    #[arg(long, default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,
    /// A time server (`host` or `host:port`, repeatable), tried after DHCP's.
    #[arg(long = "ntp")]
    pub ntp_servers: Vec<String>,
    /// Do not set the clock; only log what it would be set to.
    #[arg(long)]
    pub dry_run_clock: bool,
    /// HTTP(S) proxy the station will use (shown in the status, checked for reachability).
    #[arg(long)]
    pub proxy: Option<String>,
    /// Exit once the clock is set and a link has a DHCP address (or after this many seconds
    /// with an error); without it, run until interrupted.
    #[arg(long)]
    pub once_within: Option<u64>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    rt.block_on(async move {
        let cfg = NetConfig {
            interfaces: (!a.interfaces.is_empty()).then_some(a.interfaces),
            resolv_conf: a.resolv_conf,
            ntp_servers: a.ntp_servers,
            proxy: a.proxy,
            ..NetConfig::default()
        };
        let clock: Arc<dyn ClockSetter> = if a.dry_run_clock {
            Arc::new(DryRunClock::default())
        } else {
            Arc::new(SystemClock)
        };
        let handle = net::start(cfg, clock)?;
        let mut rx = handle.status();
        let deadline = a
            .once_within
            .map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
        loop {
            let st = rx.borrow_and_update().clone();
            let line = serde_json::to_string(&st)?;
            writeln!(std::io::stdout(), "{line}")?;
            let done = matches!(st.clock, net::ClockState::Synced { .. })
                && st.links.iter().any(|l| l.dhcp.is_some());
            if deadline.is_some() && done {
                return Ok(());
            }
            let changed = async {
                match deadline {
                    Some(d) => tokio::time::timeout_at(d, rx.changed()).await.ok(),
                    None => Some(rx.changed().await),
                }
            };
            tokio::select! {
                r = changed => match r {
                    Some(Ok(())) => {}
                    Some(Err(_)) => anyhow::bail!("networking stopped (see the log above)"),
                    None => anyhow::bail!(
                        "no DHCP address and set clock within {}s: check the cable and the \
                         network's DHCP server; the last status line shows what is missing",
                        a.once_within.unwrap_or_default()
                    ),
                },
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
        }
    })
}
