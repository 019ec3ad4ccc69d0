//! macrescue-init: PID 1 of the macrescue rescue image.
//!
//! Pure parsers (command line, config file, module index, uevents, restart policy) are separate
//! from the edges that touch the system (mounts, module loading, netlink, processes), so the
//! parsers are unit-tested on the build host and only the edges need a booted kernel.

pub mod backoff;
pub mod blkdev;
pub mod cmdline;
pub mod config;
pub mod consoles;
pub mod datapart;
pub mod exfat;
pub mod gpt;
pub mod growpart;
pub mod hotplug;
pub mod kmod;
pub mod media;
pub mod modalias;
pub mod moddep;
pub mod mounts;
pub mod netif;
pub mod settings;
pub mod shutdown;
pub mod softdep;
pub mod stage2;
pub mod supervisor;
pub mod uevent;

/// Lines the boot test (`ci/boot`) and technicians look for on the console.
pub mod markers {
    pub const STATION_READY: &str = "MACRESCUE: station ready";
    pub const DATA_MOUNTED: &str = "MACRESCUE: data partition mounted";
    pub const DATA_GROWN: &str = "MACRESCUE: data partition grown";
    pub const NO_DATA: &str = "MACRESCUE: no data partition";
    pub const SHUTDOWN: &str = "MACRESCUE: shutdown complete";
}
