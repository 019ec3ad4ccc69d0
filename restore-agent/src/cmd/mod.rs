//! One module per subcommand.

pub mod bootchain;
pub mod devices;
pub mod download;
pub mod firmwares;
pub mod identify;
pub mod net;
pub mod plan;
pub mod restore;
pub mod station;
