//! The USB/IP client's half of the protocol (v1.1.1), sans-IO: emit OP_REQ_DEVLIST and
//! OP_REQ_IMPORT, parse their replies, and read the vhci-hcd `status` table. Every integer on
//! the wire is big-endian. After a successful import the kernel takes the socket over
//! (CMD_SUBMIT/RET_SUBMIT never pass through us).
//!
//! Parsers take whatever bytes arrived so far and say `Ok(None)` when more are needed; they
//! never panic on any input.

use thiserror::Error;

pub const USBIP_VERSION: u16 = 0x0111;
pub const OP_REQ_DEVLIST: u16 = 0x8005;
pub const OP_REP_DEVLIST: u16 = 0x0005;
pub const OP_REQ_IMPORT: u16 = 0x8003;
pub const OP_REP_IMPORT: u16 = 0x0003;
/// `struct usbip_usb_device` on the wire.
pub const DEVICE_RECORD_LEN: usize = 312;
const HEADER_LEN: usize = 8;
/// A server listing more devices than this is not a USB/IP server.
const MAX_DEVICES: u32 = 4096;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum UsbipWireError {
    #[error("the USB/IP server answered operation {got:#06x}, expected {expected:#06x}: is this port a usbipd?")]
    UnexpectedReply { got: u16, expected: u16 },
    #[error("the USB/IP server lists {0} devices, which is not plausible: is this port a usbipd?")]
    TooManyDevices(u32),
    #[error("the USB/IP server refused the import of {busid} (status {status}): another client holds it, or it left")]
    ImportRefused { busid: String, status: u32 },
}

/// One exported device as the server describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    pub path: String,
    /// The server's name for the device: its physical port on a real usbipd (`1-1.2`), so a
    /// device re-enumerating keeps it; the device number changes.
    pub busid: String,
    pub busnum: u32,
    pub devnum: u32,
    /// `enum usb_device_speed` (2 full, 3 high, 5 super).
    pub speed: u32,
    pub vendor_id: u16,
    pub product_id: u16,
}

impl Exported {
    /// What vhci-hcd's `attach` file and `status` table call the device.
    pub fn devid(&self) -> u32 {
        (self.busnum << 16) | (self.devnum & 0xffff)
    }
}

/// OP_REQ_DEVLIST: header only.
pub fn devlist_request() -> [u8; 8] {
    header(OP_REQ_DEVLIST, 0)
}

/// OP_REQ_IMPORT for `busid` (NUL-padded to 32 bytes, truncated to 31).
pub fn import_request(busid: &str) -> Vec<u8> {
    let mut v = header(OP_REQ_IMPORT, 0).to_vec();
    let mut id = [0u8; 32];
    let n = busid.len().min(31);
    id[..n].copy_from_slice(&busid.as_bytes()[..n]);
    v.extend_from_slice(&id);
    v
}

fn header(code: u16, status: u32) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[..2].copy_from_slice(&USBIP_VERSION.to_be_bytes());
    h[2..4].copy_from_slice(&code.to_be_bytes());
    h[4..].copy_from_slice(&status.to_be_bytes());
    h
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// The 312-byte record (`rec.len() >= DEVICE_RECORD_LEN`, checked by callers).
fn record(rec: &[u8]) -> Exported {
    Exported {
        path: cstr(&rec[..256]),
        busid: cstr(&rec[256..288]),
        busnum: be32(rec, 288),
        devnum: be32(rec, 292),
        speed: be32(rec, 296),
        vendor_id: be16(rec, 300),
        product_id: be16(rec, 302),
    }
}

/// The OP_REP header's (code, status), or `None` before 8 bytes arrived.
fn reply_header(buf: &[u8], expected: u16) -> Result<Option<u32>, UsbipWireError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let got = be16(buf, 2);
    if got != expected {
        return Err(UsbipWireError::UnexpectedReply { got, expected });
    }
    Ok(Some(be32(buf, 4)))
}

/// OP_REP_DEVLIST: every exported device, or `None` while incomplete. A non-zero status
/// means an empty list.
pub fn parse_devlist(buf: &[u8]) -> Result<Option<Vec<Exported>>, UsbipWireError> {
    let Some(status) = reply_header(buf, OP_REP_DEVLIST)? else {
        return Ok(None);
    };
    if status != 0 {
        return Ok(Some(Vec::new()));
    }
    let Some(count) = buf.get(8..12).map(|_| be32(buf, 8)) else {
        return Ok(None);
    };
    if count > MAX_DEVICES {
        return Err(UsbipWireError::TooManyDevices(count));
    }
    let mut at = 12usize;
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let Some(rec) = buf.get(at..at + DEVICE_RECORD_LEN) else {
            return Ok(None);
        };
        // bNumInterfaces 4-byte interface records follow each device in a DEVLIST.
        let interfaces = usize::from(rec[311]);
        out.push(record(rec));
        at += DEVICE_RECORD_LEN + 4 * interfaces;
        if buf.len() < at {
            return Ok(None);
        }
    }
    Ok(Some(out))
}

/// OP_REP_IMPORT: the imported device, or `None` while incomplete.
pub fn parse_import(buf: &[u8], busid: &str) -> Result<Option<Exported>, UsbipWireError> {
    let Some(status) = reply_header(buf, OP_REP_IMPORT)? else {
        return Ok(None);
    };
    if status != 0 {
        return Err(UsbipWireError::ImportRefused {
            busid: busid.to_string(),
            status,
        });
    }
    Ok(buf
        .get(HEADER_LEN..HEADER_LEN + DEVICE_RECORD_LEN)
        .map(record))
}

/// Bytes of a complete OP_REP_IMPORT (what to read before handing the socket to the kernel;
/// nothing more may be consumed).
pub const IMPORT_REPLY_LEN: usize = HEADER_LEN + DEVICE_RECORD_LEN;

/// One row of vhci-hcd's `status` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhciPort {
    /// `hs` (USB 2) or `ss` (USB 3) root-hub half.
    pub hub: String,
    pub port: u32,
    /// `enum usbip_device_status`: 4 free (VDEV_ST_NULL), 6 in use.
    pub status: u32,
    pub devid: u32,
}

impl VhciPort {
    pub fn is_free(&self) -> bool {
        self.status == 4
    }
}

/// The rows of a `status` file (`hub port sta spd dev sockfd local_busid`); unreadable rows
/// (the header, other layouts) are skipped.
pub fn parse_vhci_status(text: &str) -> Vec<VhciPort> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 5 || !matches!(f[0], "hs" | "ss") {
                return None;
            }
            Some(VhciPort {
                hub: f[0].to_string(),
                port: f[1].parse().ok()?,
                status: f[2].parse().ok()?,
                devid: u32::from_str_radix(f[4], 16).ok()?,
            })
        })
        .collect()
}

/// The vhci hub half a device of `speed` must use.
pub fn hub_for_speed(speed: u32) -> &'static str {
    if speed >= 5 {
        "ss"
    } else {
        "hs"
    }
}

/// The line written to vhci-hcd's `attach` file.
pub fn attach_line(port: u32, sockfd: i32, devid: u32, speed: u32) -> String {
    format!("{port} {sockfd} {devid} {speed}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(busid: &str, busnum: u32, devnum: u32, pid: u16, nif: u8) -> Vec<u8> {
        let mut v = vec![0u8; DEVICE_RECORD_LEN];
        v[..9].copy_from_slice(b"/sys/x/y\0");
        v[256..256 + busid.len()].copy_from_slice(busid.as_bytes());
        v[288..292].copy_from_slice(&busnum.to_be_bytes());
        v[292..296].copy_from_slice(&devnum.to_be_bytes());
        v[296..300].copy_from_slice(&3u32.to_be_bytes());
        v[300..302].copy_from_slice(&0x05acu16.to_be_bytes());
        v[302..304].copy_from_slice(&pid.to_be_bytes());
        v[311] = nif;
        v
    }

    #[test]
    fn requests_have_the_kernel_layout() {
        assert_eq!(devlist_request(), [0x01, 0x11, 0x80, 0x05, 0, 0, 0, 0]);
        let r = import_request("1-2");
        assert_eq!(r.len(), 40);
        assert_eq!(&r[..8], &[0x01, 0x11, 0x80, 0x03, 0, 0, 0, 0]);
        assert_eq!(&r[8..12], b"1-2\0");
        assert_eq!(import_request(&"x".repeat(40))[8 + 31], 0);
    }

    #[test]
    fn devlist_with_interfaces_parses_and_waits_for_more() {
        let mut b = vec![0x01, 0x11, 0x00, 0x05, 0, 0, 0, 0, 0, 0, 0, 2];
        b.extend(rec("1-1", 1, 2, 0x1227, 1));
        b.extend([0xfe, 1, 0, 0]);
        b.extend(rec("2-1", 2, 5, 0x1281, 0));
        let full = parse_devlist(&b).unwrap().unwrap();
        assert_eq!(full.len(), 2);
        assert_eq!(full[0].busid, "1-1");
        assert_eq!(full[0].path, "/sys/x/y");
        assert_eq!(full[0].product_id, 0x1227);
        assert_eq!(full[1].devid(), 0x0002_0005);
        assert_eq!(full[1].speed, 3);
        for cut in 0..b.len() {
            assert_eq!(parse_devlist(&b[..cut]).unwrap(), None, "cut at {cut}");
        }
    }

    #[test]
    fn wrong_replies_are_named() {
        let b = [0x01, 0x11, 0x00, 0x03, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            parse_devlist(&b),
            Err(UsbipWireError::UnexpectedReply {
                got: 3,
                expected: 5
            })
        );
        let b = [0x01, 0x11, 0x00, 0x05, 0, 0, 0, 0, 0xff, 0, 0, 0];
        assert!(matches!(
            parse_devlist(&b),
            Err(UsbipWireError::TooManyDevices(_))
        ));
        let refused = [0x01, 0x11, 0x00, 0x03, 0, 0, 0, 1];
        assert_eq!(
            parse_import(&refused, "1-1").unwrap_err().to_string(),
            "the USB/IP server refused the import of 1-1 (status 1): another client holds it, or it left"
        );
    }

    #[test]
    fn import_reply_parses() {
        let mut b = vec![0x01, 0x11, 0x00, 0x03, 0, 0, 0, 0];
        b.extend(rec("1-1", 1, 3, 0x1901, 1));
        assert_eq!(b.len(), IMPORT_REPLY_LEN);
        let d = parse_import(&b, "1-1").unwrap().unwrap();
        assert_eq!((d.devid(), d.product_id), (0x0001_0003, 0x1901));
        assert_eq!(parse_import(&b[..100], "1-1").unwrap(), None);
    }

    #[test]
    fn vhci_status_table() {
        let t = "hub port sta spd dev      sockfd local_busid\n\
                 hs  0000 006 003 00010002 000003 3-1\n\
                 hs  0001 004 000 00000000 000000 0-0\n\
                 ss  0008 004 000 00000000 000000 0-0\n\
                 garbage\n";
        let p = parse_vhci_status(t);
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].devid, 0x0001_0002);
        assert!(!p[0].is_free());
        assert!(p[1].is_free());
        assert_eq!((p[2].hub.as_str(), p[2].port), ("ss", 8));
        assert_eq!(hub_for_speed(3), "hs");
        assert_eq!(hub_for_speed(5), "ss");
        assert_eq!(attach_line(1, 7, 0x10002, 3), "1 7 65538 3");
    }

    #[test]
    fn never_panics() {
        let mut b = vec![0x01, 0x11, 0x00, 0x05, 0, 0, 0, 0, 0, 0, 0, 1];
        b.extend(rec("1-1", 1, 2, 0x1227, 255));
        for cut in 0..b.len() {
            let _ = parse_devlist(&b[..cut]);
            let _ = parse_import(&b[..cut], "x");
        }
        let _ = parse_vhci_status("hs 1 2 3\nss x y z w\n\u{0}");
    }
}
