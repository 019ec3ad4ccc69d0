//! The Raspberry Pi erase button: a GPIO input line read through the Linux GPIO character
//! device (`/dev/gpiochipN`, uAPI v2), or the legacy sysfs interface where that is all there is.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::confirm::ButtonLine;

// Kernel uAPI v2 layouts (include/uapi/linux/gpio.h); sizes are checked in the tests.
const GPIO_V2_LINES_MAX: usize = 64;
const GPIO_MAX_NAME_SIZE: usize = 32;
const GPIO_V2_LINE_NUM_ATTRS_MAX: usize = 10;
const GPIO_V2_LINE_FLAG_ACTIVE_LOW: u64 = 1 << 1;
const GPIO_V2_LINE_FLAG_INPUT: u64 = 1 << 2;
const GPIO_V2_LINE_FLAG_BIAS_PULL_UP: u64 = 1 << 8;

#[repr(C)]
#[derive(Clone, Copy)]
struct LineAttribute {
    id: u32,
    padding: u32,
    value: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct LineConfigAttribute {
    attr: LineAttribute,
    mask: u64,
}

#[repr(C)]
struct LineConfig {
    flags: u64,
    num_attrs: u32,
    padding: [u32; 5],
    attrs: [LineConfigAttribute; GPIO_V2_LINE_NUM_ATTRS_MAX],
}

#[repr(C)]
struct LineRequest {
    offsets: [u32; GPIO_V2_LINES_MAX],
    consumer: [u8; GPIO_MAX_NAME_SIZE],
    config: LineConfig,
    num_lines: u32,
    event_buffer_size: u32,
    padding: [u32; 5],
    fd: i32,
}

#[repr(C)]
struct LineValues {
    bits: u64,
    mask: u64,
}

const fn iowr(nr: u32, size: usize) -> u32 {
    (3 << 30) | ((size as u32) << 16) | (0xb4 << 8) | nr
}
const GPIO_V2_GET_LINE_IOCTL: u32 = iowr(0x07, std::mem::size_of::<LineRequest>());
const GPIO_V2_LINE_GET_VALUES_IOCTL: u32 = iowr(0x0e, std::mem::size_of::<LineValues>());

/// A button on a GPIO chip line, wired to ground with the internal pull-up (pressed = low),
/// the usual Raspberry Pi wiring.
pub struct ChardevButton {
    line_fd: File,
    what: String,
}

impl ChardevButton {
    pub fn open(chip: &Path, offset: u32) -> io::Result<ChardevButton> {
        let chip_file = OpenOptions::new().read(true).write(true).open(chip)?;
        // SAFETY: LineRequest is plain old data; all-zero is its documented "nothing set" state.
        let mut req: LineRequest = unsafe { std::mem::zeroed() };
        req.offsets[0] = offset;
        req.num_lines = 1;
        let consumer = b"macrescue-erase";
        req.consumer[..consumer.len()].copy_from_slice(consumer);
        req.config.flags =
            GPIO_V2_LINE_FLAG_INPUT | GPIO_V2_LINE_FLAG_ACTIVE_LOW | GPIO_V2_LINE_FLAG_BIAS_PULL_UP;
        // SAFETY: the ioctl reads and writes exactly one LineRequest, which lives across the call.
        let rc = unsafe {
            libc::ioctl(
                chip_file.as_raw_fd(),
                GPIO_V2_GET_LINE_IOCTL as _,
                &mut req as *mut LineRequest,
            )
        };
        if rc < 0 || req.fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel handed us a fresh line fd that nothing else owns.
        let line_fd = unsafe { File::from_raw_fd(req.fd) };
        Ok(ChardevButton {
            line_fd,
            what: format!("GPIO {} line {offset}", chip.display()),
        })
    }
}

impl ButtonLine for ChardevButton {
    fn is_pressed(&mut self) -> io::Result<bool> {
        let mut values = LineValues { bits: 0, mask: 1 };
        // SAFETY: the ioctl reads and writes exactly one LineValues, alive across the call.
        let rc = unsafe {
            libc::ioctl(
                self.line_fd.as_raw_fd(),
                GPIO_V2_LINE_GET_VALUES_IOCTL as _,
                &mut values as *mut LineValues,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // Active-low was requested, so 1 means pressed.
        Ok(values.bits & 1 == 1)
    }

    fn describe(&self) -> String {
        self.what.clone()
    }
}

/// The sysfs fallback (`/sys/class/gpio/gpioN/value`, already exported as an input by the
/// image). Pressed = the value reads `0` (button to ground, pull-up).
pub struct SysfsButton {
    value: File,
    path: PathBuf,
}

impl SysfsButton {
    pub fn open(value_path: &Path) -> io::Result<SysfsButton> {
        Ok(SysfsButton {
            value: File::open(value_path)?,
            path: value_path.to_path_buf(),
        })
    }
}

impl ButtonLine for SysfsButton {
    fn is_pressed(&mut self) -> io::Result<bool> {
        let mut buf = [0u8; 4];
        self.value.rewind()?;
        let n = self.value.read(&mut buf)?;
        Ok(parse_sysfs_pressed(&buf[..n]))
    }

    fn describe(&self) -> String {
        format!("GPIO {}", self.path.display())
    }
}

fn parse_sysfs_pressed(raw: &[u8]) -> bool {
    raw.first() == Some(&b'0')
}

/// Device-tree `compatible` strings of the GPIO controllers wired to a Raspberry Pi's 40-pin
/// header, most specific first. On a Pi 5 the header hangs off RP1; the SoC's own GPIO blocks
/// there are `brcm,brcmstb-gpio` and never match.
const PI_HEADER_COMPATIBLE: &[&str] = &[
    "raspberrypi,rp1-gpio",
    "brcm,bcm2711-gpio",
    "brcm,bcm2835-gpio",
];

/// How long `header:LINE` waits for the header's GPIO driver: the init loads drivers in the
/// background, so the station can start before the chip exists.
const HEADER_WAIT: Duration = Duration::from_secs(15);

/// One GPIO chip as sysfs shows it: its device name and its device-tree `compatible` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChipInfo {
    pub name: String,
    pub compatible: Vec<String>,
}

/// Why `header:LINE` named no chip.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("no Raspberry Pi 40-pin header GPIO controller found (chips: {0}); on other boards name the chip: --gpio-button /dev/gpiochipN:LINE")]
    NotFound(String),
    #[error("several GPIO chips could be the 40-pin header ({0}): name one with --gpio-button /dev/gpiochipN:LINE")]
    Ambiguous(String),
}

/// Which chip carries the 40-pin header, whatever number the kernel gave it (on a Pi 5 that
/// depends on the order the GPIO drivers loaded).
pub fn header_chip(chips: &[ChipInfo]) -> Result<String, HeaderError> {
    for want in PI_HEADER_COMPATIBLE {
        let found: Vec<&ChipInfo> = chips
            .iter()
            .filter(|c| c.compatible.iter().any(|have| have == want))
            .collect();
        match found.as_slice() {
            [] => continue,
            [one] => return Ok(one.name.clone()),
            many => {
                let names: Vec<&str> = many.iter().map(|c| c.name.as_str()).collect();
                return Err(HeaderError::Ambiguous(names.join(", ")));
            }
        }
    }
    let seen: Vec<String> = chips
        .iter()
        .map(|c| format!("{} ({})", c.name, c.compatible.join(" ")))
        .collect();
    Err(HeaderError::NotFound(if seen.is_empty() {
        "none".into()
    } else {
        seen.join(", ")
    }))
}

/// A `compatible` file: NUL-separated strings.
fn parse_compatible(raw: &[u8]) -> Vec<String> {
    raw.split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// The GPIO chips under `sysfs` (`/sys` on a live system). The device-tree node hangs off the
/// chip itself on newer kernels and off its parent device on older ones.
pub fn list_chips(sysfs: &Path) -> Vec<ChipInfo> {
    let Ok(entries) = std::fs::read_dir(sysfs.join("bus/gpio/devices")) else {
        return Vec::new();
    };
    let mut chips: Vec<ChipInfo> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("gpiochip") {
                return None;
            }
            let dev = std::fs::canonicalize(e.path()).unwrap_or_else(|_| e.path());
            let compatible = [
                dev.join("of_node/compatible"),
                dev.join("../of_node/compatible"),
            ]
            .iter()
            .find_map(|p| std::fs::read(p).ok())
            .map(|raw| parse_compatible(&raw))
            .unwrap_or_default();
            Some(ChipInfo { name, compatible })
        })
        .collect();
    chips.sort_by(|a, b| a.name.cmp(&b.name));
    chips
}

/// Open the button named on the command line: `/dev/gpiochipN:LINE`, `header:LINE` (a
/// Raspberry Pi's 40-pin header, line = BCM GPIO number, on any Pi model), or a sysfs value
/// file.
pub fn open_button(spec: &str) -> io::Result<Box<dyn ButtonLine>> {
    if let Some((chip, offset)) = spec.rsplit_once(':') {
        let offset: u32 = offset.parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("GPIO button {spec:?}: expected /dev/gpiochipN:LINE or header:LINE"),
            )
        })?;
        let chip = if chip == "header" {
            let name = wait_for_header_chip(Path::new("/sys"), HEADER_WAIT)?;
            tracing::info!("the 40-pin header's GPIO is /dev/{name}");
            PathBuf::from("/dev").join(name)
        } else {
            PathBuf::from(chip)
        };
        return Ok(Box::new(ChardevButton::open(&chip, offset)?));
    }
    Ok(Box::new(SysfsButton::open(Path::new(spec))?))
}

fn wait_for_header_chip(sysfs: &Path, wait: Duration) -> io::Result<String> {
    let deadline = Instant::now() + wait;
    loop {
        match header_chip(&list_chips(sysfs)) {
            Ok(name) => return Ok(name),
            Err(e @ HeaderError::Ambiguous(_)) => {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(io::Error::new(io::ErrorKind::NotFound, e.to_string()))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uapi_layouts_match_the_kernel() {
        assert_eq!(std::mem::size_of::<LineAttribute>(), 16);
        assert_eq!(std::mem::size_of::<LineConfigAttribute>(), 24);
        assert_eq!(std::mem::size_of::<LineConfig>(), 272);
        assert_eq!(std::mem::size_of::<LineRequest>(), 592);
        assert_eq!(GPIO_V2_GET_LINE_IOCTL, 0xc250_b407);
        assert_eq!(GPIO_V2_LINE_GET_VALUES_IOCTL, 0xc010_b40e);
    }

    fn chip(name: &str, compatible: &[&str]) -> ChipInfo {
        ChipInfo {
            name: name.into(),
            compatible: compatible.iter().map(|c| c.to_string()).collect(),
        }
    }

    #[test]
    fn the_header_chip_is_found_by_its_controller_on_every_pi() {
        // Pi 5: the SoC's GPIO blocks load first and take the low numbers.
        let pi5 = [
            chip("gpiochip0", &["brcm,bcm7445-gpio", "brcm,brcmstb-gpio"]),
            chip("gpiochip1", &["brcm,bcm7445-gpio", "brcm,brcmstb-gpio"]),
            chip("gpiochip2", &["raspberrypi,rp1-gpio"]),
        ];
        assert_eq!(header_chip(&pi5).unwrap(), "gpiochip2");
        let pi4 = [
            chip("gpiochip0", &["brcm,bcm2711-gpio"]),
            chip("gpiochip1", &["raspberrypi,firmware-gpio"]),
        ];
        assert_eq!(header_chip(&pi4).unwrap(), "gpiochip0");
        let pi3 = [chip("gpiochip0", &["brcm,bcm2835-gpio"])];
        assert_eq!(header_chip(&pi3).unwrap(), "gpiochip0");
    }

    #[test]
    fn no_or_several_header_chips_are_named_errors() {
        let pc = [chip("gpiochip0", &[])];
        let e = header_chip(&pc).unwrap_err();
        assert_eq!(e, HeaderError::NotFound("gpiochip0 ()".into()));
        assert!(e.to_string().contains("/dev/gpiochipN:LINE"));
        assert_eq!(
            header_chip(&[]).unwrap_err(),
            HeaderError::NotFound("none".into())
        );
        let two = [
            chip("gpiochip0", &["brcm,bcm2711-gpio"]),
            chip("gpiochip3", &["brcm,bcm2711-gpio"]),
        ];
        assert_eq!(
            header_chip(&two).unwrap_err(),
            HeaderError::Ambiguous("gpiochip0, gpiochip3".into())
        );
    }

    #[test]
    fn chips_are_read_from_sysfs_with_the_node_on_the_chip_or_its_parent() {
        let root = std::env::temp_dir().join(format!("gpio-chips-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let devices = root.join("bus/gpio/devices");
        std::fs::create_dir_all(&devices).unwrap();
        // Newer kernels: of_node on the chip; older: on the platform device above it.
        let rp1 = root.join("devices/rp1/gpiochip4");
        std::fs::create_dir_all(rp1.join("of_node")).unwrap();
        std::fs::write(rp1.join("of_node/compatible"), b"raspberrypi,rp1-gpio\0").unwrap();
        let soc = root.join("devices/soc/107d508500.gpio");
        std::fs::create_dir_all(soc.join("gpiochip0")).unwrap();
        std::fs::create_dir_all(soc.join("of_node")).unwrap();
        std::fs::write(
            soc.join("of_node/compatible"),
            b"brcm,bcm7445-gpio\0brcm,brcmstb-gpio\0",
        )
        .unwrap();
        std::os::unix::fs::symlink(&rp1, devices.join("gpiochip4")).unwrap();
        std::os::unix::fs::symlink(soc.join("gpiochip0"), devices.join("gpiochip0")).unwrap();
        let chips = list_chips(&root);
        assert_eq!(
            chips,
            vec![
                chip("gpiochip0", &["brcm,bcm7445-gpio", "brcm,brcmstb-gpio"]),
                chip("gpiochip4", &["raspberrypi,rp1-gpio"]),
            ]
        );
        assert_eq!(
            wait_for_header_chip(&root, Duration::ZERO).unwrap(),
            "gpiochip4"
        );
        std::fs::remove_dir_all(&root).unwrap();
        let err = wait_for_header_chip(&root, Duration::ZERO).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn sysfs_value_reads_pressed_when_low() {
        let dir = std::env::temp_dir().join(format!("gpio-sysfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let value = dir.join("value");
        std::fs::write(&value, "1\n").unwrap();
        let mut b = SysfsButton::open(&value).unwrap();
        assert!(!b.is_pressed().unwrap());
        std::fs::write(&value, "0\n").unwrap();
        assert!(b.is_pressed().unwrap());
        assert!(!parse_sysfs_pressed(b""));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_button_spec_is_explained() {
        let err = open_button("/dev/gpiochip0:seventeen").err().unwrap();
        assert!(err.to_string().contains("expected /dev/gpiochipN:LINE"));
    }
}
