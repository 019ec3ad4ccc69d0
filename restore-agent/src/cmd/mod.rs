//! One module per subcommand.

pub mod bootchain;
pub mod devices;
pub mod identify;
pub mod plan;
