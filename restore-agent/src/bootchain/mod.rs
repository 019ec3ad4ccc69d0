//! Taking a Mac from DFU to `bootx`: the plans (pure), the image source, and the driver that
//! executes the plans over USB.

pub mod driver;
pub mod images;
pub mod plan;

pub use driver::{BootchainError, Driver, DriverOptions, Outcome, Progress, Timeouts};
pub use images::{ImageError, ImageProvider, PersonalizedDir};
pub use plan::{Stage, Step};
