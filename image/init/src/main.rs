//! macrescue-init: the rescue image's PID 1, and its `/bin/modprobe` for the kernel.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::os::fd::AsFd;

use anyhow::Context;
use macrescue_init::backoff::Backoff;
use macrescue_init::consoles::{parse_proc_consoles, ConsoleWriter, Consoles};
use macrescue_init::hotplug::{BootHold, UeventSocket, Wakeup};
use macrescue_init::kmod::Loader;
use macrescue_init::settings::Settings;
use macrescue_init::shutdown::{self, Action};
use macrescue_init::uevent::Uevent;
use macrescue_init::{
    cmdline, config, datapart, growpart, kmod, markers, mounts, netif, settings, stage2, supervisor,
};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tracing::{debug, info, warn};

const DATA_DIR: &str = "/data";
const CONFIG: &str = "/data/macrescue/config.toml";
/// When a stick probed at once (`usb-storage.delay_use=0`) has shown no disk yet, scan again:
/// a second later than the kernel's default probe delay would have.
const SCSI_RESCAN_AFTER: Duration = Duration::from_secs(2);

fn main() {
    let argv0 = std::env::args().next().unwrap_or_default();
    if argv0.rsplit('/').next() == Some("modprobe") {
        std::process::exit(modprobe_helper(std::env::args().skip(1).collect()));
    }
    if std::process::id() != 1 {
        eprintln!(
            "macrescue-init must run as PID 1 (the kernel starts it as /init); \
             invoked as modprobe it loads kernel modules"
        );
        std::process::exit(2);
    }
    if let Err(e) = run() {
        // PID 1 must never exit (the kernel would panic): report and keep the machine up so
        // the message stays on screen.
        eprintln!("macrescue-init: {e:#}");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

/// The kernel runs `/bin/modprobe -q -- NAME` for request_module() (fs-exfat, nls_utf8…).
fn modprobe_helper(args: Vec<String>) -> i32 {
    let quiet = args.iter().any(|a| a == "-q" || a == "--quiet");
    let names: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let line = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let loader =
        Loader::open(Path::new("/"), release.trim()).with_params(cmdline::module_params(&line));
    let mut rc = 0;
    for name in names {
        if let Err(e) = loader.load_name_or_alias(name) {
            if !quiet {
                eprintln!("modprobe: {e}");
            }
            rc = 1;
        }
    }
    rc
}

fn run() -> anyhow::Result<()> {
    mounts::early();
    let started_at = uptime();
    // The agent and the shell, inflated on another CPU while the drivers load and the stick
    // enumerates (stage2.rs: why they are not in the kernel's part of the initramfs).
    let stage2 = std::thread::Builder::new().name("stage2".into()).spawn(|| {
        let t = Instant::now();
        (stage2::inflate_all(Path::new("/")), t.elapsed())
    });
    let line = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let cmd = cmdline::parse(&line);
    let mut names =
        parse_proc_consoles(&std::fs::read_to_string("/proc/consoles").unwrap_or_default());
    if names.is_empty() {
        names = cmd.consoles.clone();
    }
    // Leaked on purpose: the console set lives as long as PID 1, and the logger needs 'static.
    let consoles: &'static Consoles = Box::leak(Box::new(Consoles::open(&names)));
    let mut settings = Settings::default();
    let mut setting_errors = Vec::new();
    for (k, v) in &cmd.settings {
        if let Err(e) = settings.apply(k, v) {
            setting_errors.push(e);
        }
    }
    let fmt = tracing_subscriber::fmt()
        .with_writer(move || ConsoleWriter(consoles))
        .with_target(false)
        .with_ansi(false);
    if settings.debug {
        // Seconds since kernel start, as the kernel's own lines show them: the debug log is
        // how boot time is taken apart (image/README.md, "Where the time goes").
        fmt.with_max_level(tracing::Level::DEBUG)
            .with_timer(KernelClock)
            .init();
    } else {
        fmt.with_max_level(tracing::Level::INFO)
            .without_time()
            .init();
    }
    // Signals are taken synchronously through a signalfd; threads started after this inherit
    // the mask, children get a clean one from std::process.
    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGHUP,
    ] {
        mask.add(s);
    }
    mask.thread_block().context("cannot block signals")?;
    let sfd = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .context("cannot create a signalfd")?;

    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    // Registered here, not found by the kernel at its default /sbin/modprobe: built-in crypto
    // self-tests request modules while the kernel starts, and each request would wait for the
    // whole initramfs and run this binary for nothing (image/README.md, "Where the time goes").
    let _ = std::fs::write("/proc/sys/kernel/modprobe", "/bin/modprobe");
    let loader = Arc::new(
        Loader::open(Path::new("/"), release.trim()).with_params(cmdline::module_params(&line)),
    );
    // Block-device uevents wake the wait for the data partition (no sysfs polling).
    let block_events = Arc::new(Wakeup::default());
    let hold = Arc::new(BootHold::holding());
    match UeventSocket::open() {
        Ok(sock) => {
            let media = macrescue_init::media::Media::new(settings.data_label.clone());
            let wake = block_events.clone();
            let on_event = move |ev: &Uevent| {
                if ev.get("SUBSYSTEM") == Some("block") {
                    wake.notify();
                }
                // A technician plugging in a keyboard to type an erase code sees that it works.
                if let Some(name) = ev.added_input_device() {
                    info!("input device: {name}");
                }
                media.handle(ev)
            };
            if let Err(e) = sock.spawn(loader.clone(), hold.clone(), on_event) {
                warn!("cannot start the hotplug thread: {e}");
            }
        }
        Err(e) => warn!("cannot listen for uevents ({e}); hotplugged devices will get no drivers"),
    }
    // Drivers load in the background while the init waits for the data partition: the boot
    // is as long as the path to /data (host controller, stick, SCSI disk, file system), not
    // that plus every other driver. The image's extra modules (the stick's storage stack) load
    // alongside coldplug, so they are live when the stick enumerates instead of being loaded
    // one after another by the hotplug thread then.
    let drivers = {
        let loader = loader.clone();
        let hold = hold.clone();
        let extra = settings.modules.clone();
        let load = move || {
            let t = Instant::now();
            // First the USB host controllers, alone: the stick is behind one, and once its root
            // hub is registered the kernel spends ~0.3 s on USB timers (power-good, debounce,
            // port reset) before the stick enumerates. Module loading is CPU-bound (signature
            // check, relocation): anything loaded alongside only delays those timers' start.
            // They are PCI devices: the bus's few entries, not a walk of all of sysfs.
            let hosts: Vec<String> = kmod::bus_modaliases(Path::new("/sys/bus/pci/devices"))
                .into_iter()
                .filter(|a| kmod::is_usb_host(a))
                .collect();
            let first = loader.coldplug_aliases(hosts);
            debug!(
                "coldplug: USB host controllers in {} ms",
                t.elapsed().as_millis()
            );
            // Then, while the stick enumerates, the storage stack it needs (the image's extra
            // modules) and every other device's drivers (the NIC), one module at a time: the
            // kernel's USB hub work (debounce, reset, enumeration) needs a CPU meanwhile, and a
            // module load does not yield its CPU while it relocates and checks signatures.
            for m in &extra {
                if let Err(e) = loader.load_name_or_alias(m) {
                    warn!("{e}");
                }
            }
            let rest = loader.coldplug_serial(Path::new("/sys/devices"), |a| {
                !kmod::is_usb_host(a) && !hold.hold(a)
            });
            info!(
                "coldplug: {} driver matches in {} ms",
                first + rest,
                t.elapsed().as_millis()
            );
        };
        std::thread::Builder::new()
            .name("coldplug".into())
            .spawn(load)
            .map_err(|e| warn!("cannot start the coldplug thread ({e}); loading drivers first"))
            .ok()
    };
    // Everything else waits until the USB host controllers' drivers are on their way: the
    // stick's enumeration cannot start before them.
    info!(
        "macrescue-init {} on consoles {:?}, {started_at:.2} s after kernel start",
        env!("CARGO_PKG_VERSION"),
        consoles.names(),
    );
    for e in setting_errors {
        warn!("kernel command line: {e}");
    }
    // Ctrl-Alt-Del becomes SIGINT for us instead of an immediate hard reboot.
    if let Err(e) = nix::sys::reboot::set_cad_enabled(false) {
        warn!("cannot route Ctrl-Alt-Del to the init: {e}");
    }
    if let Err(e) = netif::loopback_up() {
        warn!("cannot bring up lo: {e}");
    }
    if drivers.is_none() {
        // The closure moved into the failed spawn; load on this thread instead.
        for m in &settings.modules {
            if let Err(e) = loader.load_name_or_alias(m) {
                warn!("{e}");
            }
        }
        let matched = loader.coldplug(Path::new("/sys/devices"));
        info!("coldplug: {matched} driver matches");
    }

    // The station and the shell are programs of the second stage.
    let programs = match stage2
        .map_err(|e| e.to_string())
        .and_then(|h| h.join().map_err(|_| "its thread panicked".to_string()))
    {
        Ok((Ok(done), took)) => {
            if done.files > 0 {
                debug!(
                    "stage 2: {} programs ({} KiB) inflated in {} ms",
                    done.files,
                    done.bytes / 1024,
                    took.as_millis()
                );
            }
            true
        }
        Ok((Err(e), _)) => {
            warn!("{e}");
            false
        }
        Err(e) => {
            warn!("cannot unpack the image's programs: {e}");
            false
        }
    };
    let consoles_arc = Arc::new(Consoles::open(&consoles.names()));
    // The station starts now, while the stick is still being found: it brings up the network
    // meanwhile and reads its config once the data partition is handled (DATA_PENDING).
    // Not for a station set up for USB/IP on the command line: vhci-hcd must be loaded first.
    let early = (programs
        && settings.data_label.is_some()
        && !settings::station_uses_usbip(&settings.station, &[]))
    .then(|| start_early(&settings.station, consoles_arc.clone()))
    .flatten();
    let data = settings
        .data_label
        .clone()
        .and_then(|label| mount_data(&label, settings.data_wait, &loader, consoles, &block_events));
    // The station starts with every coldplugged driver in place (its NIC, the Mac's port).
    if let Some(h) = drivers {
        let _ = h.join();
    }
    let mut entries = Vec::new();
    if data.is_some() {
        match std::fs::read_to_string(CONFIG) {
            Ok(text) => {
                let errors;
                (entries, errors) = config::parse(&text);
                for e in errors {
                    warn!("{CONFIG}: {e}");
                }
                for e in settings.apply_config(&entries) {
                    warn!("{CONFIG}: {e}");
                }
                // Modules the owner listed in the config file (the image's are loaded already
                // and skipped).
                for m in &settings.modules {
                    if let Err(e) = loader.load_name_or_alias(m) {
                        warn!("{CONFIG}: {e}");
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                debug!("no {CONFIG}; using the image's settings")
            }
            Err(e) => warn!("cannot read {CONFIG}: {e}; using the image's settings"),
        }
    }
    // Keyboards and other devices held back on the way to /data get their drivers now, beside
    // the station's start.
    let held = hold.release();
    if !held.is_empty() {
        let loader = loader.clone();
        let load = move || {
            for alias in held {
                if loader.load_alias_counted(&alias).inserted > 0 {
                    info!("hotplug: drivers for {alias} (held until /data was handled)");
                }
            }
        };
        if let Err(e) = std::thread::Builder::new().name("held".into()).spawn(load) {
            warn!("cannot load the held-back drivers: {e}");
        }
    }
    let usbip = settings::station_uses_usbip(&settings.station, &entries);
    // The early station goes on only as what the init would start now: same command, the data
    // partition mounted where it was told, no USB/IP to set up under it. Otherwise it is
    // stopped (it removes the addresses it configured) and started again below.
    let early = early.and_then(|e| {
        let why = if data.is_none() {
            "there is no data partition"
        } else if e.argv != settings.station {
            "the config file names another station command"
        } else if usbip {
            "the config file sets up USB/IP (vhci-hcd loads first)"
        } else {
            return Some(e);
        };
        info!("starting the station again: {why}");
        e.stop();
        None
    });
    // USB/IP's vhci-hcd, only when the station will use it: before the station starts (loading
    // it under a running station hung the guest), not on the way to /data.
    if usbip {
        if let Err(e) = loader.load_name_or_alias("vhci-hcd") {
            warn!("the station is set up for USB/IP but {e}");
        }
    }
    let early = early.map(|e| e.release());
    supervise(settings, consoles, consoles_arc, sfd, data, early)
}

const DATA_PENDING: &str = "/run/macrescue/data-pending";

/// A station started before the data partition was handled.
struct EarlyStation {
    argv: Vec<String>,
    pid: Pid,
    started: Instant,
}

fn start_early(argv: &[String], consoles: Arc<Consoles>) -> Option<EarlyStation> {
    let pending = Path::new(DATA_PENDING);
    let made = pending
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(pending, ""));
    if let Err(e) = made {
        warn!("cannot create {DATA_PENDING} ({e}); the station starts after the data partition");
        return None;
    }
    let started = Instant::now();
    match supervisor::spawn_station(argv, consoles, Some(DATA_DIR), Some(pending)) {
        Ok(pid) => {
            info!(
                "started station {:?} (pid {pid}); it waits for the data partition",
                argv.join(" ")
            );
            Some(EarlyStation {
                argv: argv.to_vec(),
                pid,
                started,
            })
        }
        Err(e) => {
            debug!("cannot start the station early ({e}); it starts after the data partition");
            let _ = std::fs::remove_file(pending);
            None
        }
    }
}

impl EarlyStation {
    /// Tell the station the data partition is handled; it reads its config file now.
    fn release(self) -> (Pid, Instant) {
        let _ = std::fs::remove_file(DATA_PENDING);
        (self.pid, self.started)
    }

    /// SIGTERM (it withdraws its DHCP addresses and exits), SIGKILL after 5 s; reaped here.
    fn stop(self) {
        let _ = nix::sys::signal::kill(self.pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match waitpid(self.pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Ok(WaitStatus::StillAlive) => {
                    let _ = nix::sys::signal::kill(self.pid, Signal::SIGKILL);
                    let _ = waitpid(self.pid, None);
                    break;
                }
                _ => break,
            }
        }
        let _ = std::fs::remove_file(DATA_PENDING);
    }
}

/// Wait for the data partition, mount it at /data and say so on the console.
fn mount_data(
    label: &str,
    wait: Duration,
    loader: &Loader,
    consoles: &Consoles,
    block_events: &Wakeup,
) -> Option<PathBuf> {
    let start = Instant::now();
    let deadline = start + wait;
    let mut rescanned = false;
    let part = loop {
        let seen = block_events.count();
        let parts = datapart::scan(Path::new("/sys/class/block"));
        if let Some(p) = datapart::select(&parts, label) {
            break p.clone();
        }
        let now = Instant::now();
        if !rescanned && now >= start + SCSI_RESCAN_AFTER {
            rescanned = true;
            let hosts = datapart::rescan_scsi_hosts(Path::new("/sys/class/scsi_host"));
            if hosts > 0 {
                info!("no partition {label} yet: asked {hosts} USB/SCSI hosts to scan again");
            }
        }
        if now >= deadline {
            consoles.write_all_consoles(
                format!(
                    "{} named {label} (waited {} s); IPSWs will be streamed and nothing kept\n",
                    markers::NO_DATA,
                    wait.as_secs()
                )
                .as_bytes(),
            );
            return None;
        }
        // Woken by the hotplug thread's block uevents; the timeout covers a dead uevent socket.
        let left = deadline.saturating_duration_since(now);
        block_events.wait_past(seen, left.min(Duration::from_millis(250)));
    };
    let dev = datapart::node(&part);
    debug!(
        "{} appeared after {} ms",
        part.devname,
        start.elapsed().as_millis()
    );
    // First boot on a bigger medium: grow before anything reads the partition.
    match growpart::on_boot(&part.devname, label) {
        Ok(Some(line)) => consoles.write_all_consoles(format!("{line}\n").as_bytes()),
        Ok(None) => {}
        Err(e) => warn!("data partition {label} not grown: {e}"),
    }
    let mut head = vec![0u8; 4096];
    let read = std::fs::File::open(&dev).and_then(|mut f| {
        use std::io::Read;
        f.read(&mut head)
    });
    let fstype = match read.map(|n| datapart::detect_fs(&head[..n])) {
        Ok(Some(t)) => t,
        Ok(None) => {
            warn!(
                "{} (partition {label}) has no exFAT, FAT or ext4 file system; format it as exFAT",
                dev.display()
            );
            return None;
        }
        Err(e) => {
            warn!("cannot read {}: {e}", dev.display());
            return None;
        }
    };
    // The kernel would ask /bin/modprobe for fs-TYPE itself; loading first gives a clearer error.
    if let Err(e) = loader.load_name_or_alias(&format!("fs-{fstype}")) {
        debug!("{e}");
    }
    let target = Path::new(DATA_DIR);
    debug!("mounting {} ({fstype})", dev.display());
    match mounts::data(&dev, fstype, target) {
        Ok(()) => {
            let _ = std::fs::create_dir_all(target.join("macrescue"));
            consoles.write_all_consoles(
                format!(
                    "{} {} ({fstype}, {label}) at {DATA_DIR}, {:.2} s after kernel start\n",
                    markers::DATA_MOUNTED,
                    dev.display(),
                    uptime()
                )
                .as_bytes(),
            );
            Some(target.to_path_buf())
        }
        Err(e) => {
            warn!(
                "cannot mount {} ({fstype}) at {DATA_DIR}: {e}; run a file-system check on it from another computer",
                dev.display()
            );
            None
        }
    }
}

struct Child {
    pid: Option<Pid>,
    started: Instant,
    restart_at: Option<Instant>,
    backoff: Backoff,
}

impl Child {
    fn new(max: Duration) -> Self {
        Self {
            pid: None,
            started: Instant::now(),
            restart_at: Some(Instant::now()),
            backoff: Backoff::new(Duration::from_millis(500), max, Duration::from_secs(60)),
        }
    }

    fn exited(&mut self, what: &str, how: &str) {
        let ran = self.started.elapsed();
        let delay = self.backoff.on_exit(ran);
        warn!(
            "{what} {how} after {:.1} s; restarting in {:.1} s",
            ran.as_secs_f32(),
            delay.as_secs_f32()
        );
        self.pid = None;
        self.restart_at = Some(Instant::now() + delay);
    }
}

fn supervise(
    settings: Settings,
    consoles: &'static Consoles,
    consoles_arc: Arc<Consoles>,
    sfd: SignalFd,
    data: Option<PathBuf>,
    early: Option<(Pid, Instant)>,
) -> anyhow::Result<()> {
    let data_str = data.as_ref().and_then(|d| d.to_str()).map(str::to_string);
    let mut station = Child::new(settings.restart_max);
    if let Some((pid, started)) = early {
        station.pid = Some(pid);
        station.started = started;
        station.restart_at = None;
    }
    let mut ready_reported = false;
    let shell_tty = settings
        .shell
        .clone()
        .filter(|_| supervisor::shell_available())
        .filter(|t| Path::new("/dev").join(t).exists());
    let mut shell = shell_tty.as_ref().map(|_| Child::new(settings.restart_max));
    if let Some(t) = &shell_tty {
        info!("emergency shell on {t}");
    }
    loop {
        let now = Instant::now();
        if station.pid.is_none() && station.restart_at.is_some_and(|t| t <= now) {
            station.started = now;
            ready_reported = false;
            match supervisor::spawn_station(
                &settings.station,
                consoles_arc.clone(),
                data_str.as_deref(),
                None,
            ) {
                Ok(pid) => {
                    info!(
                        "started station {:?} (pid {pid})",
                        settings.station.join(" ")
                    );
                    station.pid = Some(pid);
                    station.restart_at = None;
                }
                Err(e) => {
                    supervisor::explain_spawn_error("station", &settings.station, &e);
                    station.exited("station", "could not start");
                }
            }
        }
        if let (Some(sh), Some(tty)) = (shell.as_mut(), shell_tty.as_deref()) {
            if sh.pid.is_none() && sh.restart_at.is_some_and(|t| t <= now) {
                sh.started = now;
                match supervisor::spawn_shell(tty) {
                    Ok(pid) => {
                        sh.pid = Some(pid);
                        sh.restart_at = None;
                    }
                    Err(e) => {
                        warn!("emergency shell on {tty}: {e}");
                        sh.exited("shell", "could not start");
                    }
                }
            }
        }
        if let Some(pid) = station.pid {
            if !ready_reported && station.started.elapsed() >= settings.ready_after {
                consoles.write_all_consoles(
                    format!(
                        "{} {:.2} s after kernel start (pid {pid}: {})\n",
                        markers::STATION_READY,
                        uptime(),
                        settings.station.join(" ")
                    )
                    .as_bytes(),
                );
                ready_reported = true;
            }
        }

        let mut wake: Vec<Instant> = [
            station.restart_at,
            shell.as_ref().and_then(|s| s.restart_at),
        ]
        .into_iter()
        .flatten()
        .collect();
        if station.pid.is_some() && !ready_reported {
            wake.push(station.started + settings.ready_after);
        }
        let timeout = match wake.into_iter().min() {
            Some(t) => {
                let ms = t.saturating_duration_since(Instant::now()).as_millis();
                PollTimeout::try_from(ms.min(60_000) as i32).unwrap_or(PollTimeout::MAX)
            }
            None => PollTimeout::NONE,
        };
        let mut fds = [PollFd::new(sfd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => warn!("poll: {e}"),
        }
        while let Ok(Some(info)) = sfd.read_signal() {
            let Ok(sig) = Signal::try_from(info.ssi_signo as i32) else {
                continue;
            };
            if let Some(action) = Action::for_signal(sig) {
                shutdown::run(action, data.as_deref());
            }
            if sig == Signal::SIGHUP {
                info!("SIGHUP: restarting the station");
                if let Some(pid) = station.pid {
                    let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
                }
            }
        }
        reap(&mut station, shell.as_mut());
    }
}

/// Debug-log timestamps on the kernel's clock (`[    2.345678]` in dmesg, here `2.346`).
struct KernelClock;

impl tracing_subscriber::fmt::time::FormatTime for KernelClock {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        write!(w, "{:.3}", uptime())
    }
}

/// Seconds since the kernel started (the boot-time figure that excludes the firmware).
fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Collect every exited process (PID 1 inherits all orphans) and note our own children.
fn reap(station: &mut Child, mut shell: Option<&mut Child>) {
    loop {
        let (pid, how) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => (pid, format!("exited with status {code}")),
            Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, format!("was killed by {sig}")),
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => continue,
        };
        if station.pid == Some(pid) {
            station.exited("station", &how);
        } else if let Some(sh) = shell.as_deref_mut().filter(|s| s.pid == Some(pid)) {
            sh.exited("emergency shell", &how);
        } else {
            debug!("reaped pid {pid} ({how})");
        }
    }
}
