//! The station's USB/IP client against a scripted server and a fake vhci-hcd directory: which
//! port it attaches to, when it waits, and that it imports a device only when it is new or
//! gone. The kernel is played by this test: it writes vhci-hcd's `status` table and the root
//! hub's sysfs directories the client reads, and reads what the client writes to `attach`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use restore_agent::usbip::{UsbipClient, UsbipConfig};

/// A USB/IP server exporting one high-speed device, bus id `1-1`, busnum 1, whose device
/// number the test changes to play a re-enumeration. Imported sockets are kept open (a kernel
/// would own them).
struct Server {
    addr: String,
    devnum: Arc<AtomicU32>,
    imports: Arc<AtomicU32>,
}

fn record(devnum: u32) -> Vec<u8> {
    let mut r = vec![0u8; 312];
    r[..12].copy_from_slice(b"/sys/fake/1\0");
    r[256..259].copy_from_slice(b"1-1");
    r[288..292].copy_from_slice(&1u32.to_be_bytes());
    r[292..296].copy_from_slice(&devnum.to_be_bytes());
    r[296..300].copy_from_slice(&3u32.to_be_bytes()); // USB_SPEED_HIGH
    r[300..302].copy_from_slice(&0x05acu16.to_be_bytes());
    r[302..304].copy_from_slice(&0x1281u16.to_be_bytes());
    r
}

impl Server {
    fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let devnum = Arc::new(AtomicU32::new(2));
        let imports = Arc::new(AtomicU32::new(0));
        let (d, i) = (devnum.clone(), imports.clone());
        let kept: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else { continue };
                let mut h = [0u8; 8];
                if s.read_exact(&mut h).is_err() {
                    continue;
                }
                let dev = record(d.load(Ordering::SeqCst));
                match [h[2], h[3]] {
                    [0x80, 0x05] => {
                        let mut reply = vec![0x01, 0x11, 0x00, 0x05, 0, 0, 0, 0, 0, 0, 0, 1];
                        reply.extend_from_slice(&dev);
                        let _ = s.write_all(&reply);
                    }
                    [0x80, 0x03] => {
                        let mut busid = [0u8; 32];
                        if s.read_exact(&mut busid).is_err() {
                            continue;
                        }
                        assert_eq!(&busid[..4], b"1-1\0");
                        i.fetch_add(1, Ordering::SeqCst);
                        let mut reply = vec![0x01, 0x11, 0x00, 0x03, 0, 0, 0, 0];
                        reply.extend_from_slice(&dev);
                        let _ = s.write_all(&reply);
                        kept.lock().unwrap().push(s);
                    }
                    other => panic!("unexpected USB/IP request {other:02x?}"),
                }
            }
        });
        Server {
            addr,
            devnum,
            imports,
        }
    }

    fn imports(&self) -> u32 {
        self.imports.load(Ordering::SeqCst)
    }
}

/// A vhci_hcd.0 directory: `status`, `attach`, and root hub `usb1` (high speed) whose child
/// directory `1-P` exists while "the USB core" has a device on root-hub port P.
struct FakeVhci {
    dir: PathBuf,
}

impl FakeVhci {
    fn new(name: &str) -> FakeVhci {
        let dir =
            std::env::temp_dir().join(format!("macrescue-vhci-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("usb1")).unwrap();
        std::fs::write(dir.join("usb1/speed"), "480\n").unwrap();
        std::fs::create_dir_all(dir.join("usb2")).unwrap();
        std::fs::write(dir.join("usb2/speed"), "5000\n").unwrap();
        std::fs::write(dir.join("attach"), "").unwrap();
        let v = FakeVhci { dir };
        v.status(&[(0, 4, 0), (1, 4, 0)]);
        v
    }

    /// Rows (port, status, devid) of the hs half; the ss half is two free ports.
    fn status(&self, hs: &[(u32, u32, u32)]) {
        let mut t = String::from("hub port sta spd dev      sockfd local_busid\n");
        for &(port, st, devid) in hs {
            t += &format!("hs  {port:04} {st:03} 000 {devid:08x} 000000 0-0\n");
        }
        t += "ss  0002 004 000 00000000 000000 0-0\nss  0003 004 000 00000000 000000 0-0\n";
        std::fs::write(self.dir.join("status"), t).unwrap();
    }

    fn kernel_device(&self, rhport: u32, present: bool) {
        let p = self.dir.join(format!("usb1/1-{rhport}"));
        if present {
            std::fs::create_dir_all(p).unwrap();
        } else {
            std::fs::remove_dir_all(p).unwrap();
        }
    }

    /// What the client wrote to `attach` since the last call ("" for nothing).
    fn take_attach(&self) -> String {
        let p = self.dir.join("attach");
        let text = std::fs::read_to_string(&p).unwrap();
        std::fs::write(&p, "").unwrap();
        text
    }

    fn client(&self, same_port_wait: Duration) -> UsbipClient {
        UsbipClient::new(UsbipConfig {
            servers: Vec::new(),
            vhci: self.dir.clone(),
            poll: Duration::from_millis(10),
            same_port_wait,
            io_timeout: Duration::from_secs(5),
        })
    }
}

impl Drop for FakeVhci {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `port sockfd devid speed` → (port, devid, speed).
fn attached(line: &str) -> (u32, u32, u32) {
    let f: Vec<u32> = line
        .split_whitespace()
        .map(|w| w.parse().unwrap())
        .collect();
    assert_eq!(f.len(), 4, "attach line {line:?}");
    (f[0], f[2], f[3])
}

#[test]
fn a_new_device_avoids_a_freed_port_whose_old_device_the_kernel_still_has() {
    let server = Server::start();
    let vhci = FakeVhci::new("new");
    // Port 0 is free in vhci-hcd's table, but the USB core has not dropped its device yet.
    vhci.kernel_device(1, true);
    let mut client = vhci.client(Duration::from_millis(100));
    client.poll(&server.addr).unwrap();
    assert_eq!(attached(&vhci.take_attach()), (1, 0x0001_0002, 3));
}

#[test]
fn a_reenumerated_device_waits_until_the_kernel_dropped_its_old_one() {
    let server = Server::start();
    let vhci = FakeVhci::new("reenum");
    let mut client = vhci.client(Duration::from_secs(60));
    client.poll(&server.addr).unwrap();
    assert_eq!(attached(&vhci.take_attach()), (0, 0x0001_0002, 3));
    vhci.status(&[(0, 6, 0x0001_0002), (1, 4, 0)]);
    vhci.kernel_device(1, true);

    // The Mac re-enumerates: the server closed the old connection (vhci frees the port at
    // once) and exports the next incarnation; the hub thread has not handled the disconnect.
    server.devnum.store(3, Ordering::SeqCst);
    vhci.status(&[(0, 4, 0), (1, 4, 0)]);
    for _ in 0..3 {
        client.poll(&server.addr).unwrap();
    }
    // Attaching now would let the kernel keep the old device (identical descriptors from iBSS
    // to iBEC) and never report the re-enumeration; nor may the Mac move to port 1.
    assert_eq!(
        vhci.take_attach(),
        "",
        "attached while the old device was still there"
    );
    assert_eq!(server.imports(), 1);

    vhci.kernel_device(1, false);
    client.poll(&server.addr).unwrap();
    // Same port: the Mac keeps its USB location.
    assert_eq!(attached(&vhci.take_attach()), (0, 0x0001_0003, 3));
    assert_eq!(server.imports(), 2);
}

#[test]
fn a_device_is_imported_again_only_when_new_or_gone() {
    let server = Server::start();
    let vhci = FakeVhci::new("reimport");
    // No waiting for a previous port: the last step moves on at once.
    let mut client = vhci.client(Duration::ZERO);
    client.poll(&server.addr).unwrap();
    assert_eq!(server.imports(), 1);
    assert_eq!(attached(&vhci.take_attach()).0, 0);

    // Attached, the USB core has not talked to it yet: vhci-hcd shows NOTASSIGNED, devid 0.
    vhci.status(&[(0, 5, 0), (1, 4, 0)]);
    client.poll(&server.addr).unwrap();
    // In use with our device.
    vhci.status(&[(0, 6, 0x0001_0002), (1, 4, 0)]);
    client.poll(&server.addr).unwrap();
    // Being torn down after an error: wait for the table to say free.
    vhci.status(&[(0, 7, 0), (1, 4, 0)]);
    client.poll(&server.addr).unwrap();
    assert_eq!(
        server.imports(),
        1,
        "a device already attached was imported again"
    );
    assert_eq!(vhci.take_attach(), "");

    // The kernel dropped the connection: the same incarnation is imported again.
    vhci.status(&[(0, 4, 0), (1, 4, 0)]);
    client.poll(&server.addr).unwrap();
    assert_eq!(server.imports(), 2);
    assert_eq!(attached(&vhci.take_attach()), (0, 0x0001_0002, 3));

    // A new incarnation is imported even while the table still shows the old one; its port
    // is not free and same_port_wait is over, so it moves to the next free one.
    vhci.status(&[(0, 6, 0x0001_0002), (1, 4, 0)]);
    server.devnum.store(4, Ordering::SeqCst);
    client.poll(&server.addr).unwrap();
    assert_eq!(server.imports(), 3);
    assert_eq!(attached(&vhci.take_attach()), (1, 0x0001_0004, 3));
}
