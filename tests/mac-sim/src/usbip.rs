//! STAND-IN for the usbip branch's USB/IP server (agreed API only); replaced at merge.

use crate::wire::SimDevice;

pub struct ExportOptions {
    pub listen: std::net::SocketAddr,
    pub attach: bool,
}

impl ExportOptions {
    pub fn new(listen: std::net::SocketAddr, attach: bool) -> Self {
        ExportOptions { listen, attach }
    }
}

pub fn serve(devices: Vec<Box<dyn SimDevice>>, opts: ExportOptions) -> std::io::Result<()> {
    let _ = (devices.len(), opts.listen, opts.attach);
    Err(std::io::Error::other(
        "the USB/IP front end is not merged yet (usbip branch)",
    ))
}
