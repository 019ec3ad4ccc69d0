//! One module per subcommand.

pub mod bootchain;
pub mod devices;
pub mod firmwares;
pub mod identify;
pub mod net;
pub mod plan;
