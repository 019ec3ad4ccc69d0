//! The Raspberry Pi erase button: a GPIO input line read through the Linux GPIO character
//! device (`/dev/gpiochipN`, uAPI v2), or the legacy sysfs interface where that is all there is.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};

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

/// Open the button named on the command line: `/dev/gpiochipN:OFFSET` or a sysfs value file.
pub fn open_button(spec: &str) -> io::Result<Box<dyn ButtonLine>> {
    if let Some((chip, offset)) = spec.rsplit_once(':') {
        let offset: u32 = offset.parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("GPIO button {spec:?}: expected /dev/gpiochipN:LINE"),
            )
        })?;
        return Ok(Box::new(ChardevButton::open(Path::new(chip), offset)?));
    }
    Ok(Box::new(SysfsButton::open(Path::new(spec))?))
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
