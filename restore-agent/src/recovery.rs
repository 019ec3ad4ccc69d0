//! iBoot's recovery-mode protocol (iBSS "stage 1" and iBEC "stage 2", 05ac:1280–1283), sans-IO
//! (protocol.md §3.1–§3.2).
//!
//! Everything here turns an intent (a command, an environment query, a file upload) into the
//! exact USB transfers iBoot expects, and parses iBoot's replies. The boot-chain driver executes
//! the transfers.

use std::ops::Range;
use std::time::Duration;

use crate::usb::ControlSetup;

/// Longest command iBoot takes, NUL excluded (libirecovery rejects 256 and more).
pub const MAX_COMMAND_LEN: usize = 255;
/// Bulk OUT endpoint for file uploads.
pub const UPLOAD_ENDPOINT: u8 = 0x04;
/// Upload chunk size.
pub const UPLOAD_CHUNK: usize = 0x8000;
/// Uploads whose length is a multiple of this end with a zero-length packet.
pub const UPLOAD_ZLP_MULTIPLE: usize = 512;
/// Length asked for when reading a getenv/getret reply.
pub const REPLY_LENGTH: u16 = 255;
/// Default timeout of recovery-mode transfers (libirecovery's USB_TIMEOUT).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(10_000);
/// Timeout of the zero-length `21/01` after RestoreKernelCache.
pub const KERNELCACHE_NOTIFY_TIMEOUT: Duration = Duration::from_millis(5_000);

/// Console output: interface 1, alternate setting 1, bulk IN 0x81, 4096-byte reads, 500 ms.
pub const CONSOLE_INTERFACE: u8 = 1;
pub const CONSOLE_ALT_SETTING: u8 = 1;
pub const CONSOLE_ENDPOINT: u8 = 0x81;
pub const CONSOLE_READ_LEN: usize = 4096;
pub const CONSOLE_TIMEOUT: Duration = Duration::from_millis(500);

/// The boot-args both stages set for a Mac restore (§3.3 step 7, §3.4 step 10).
pub const RESTORE_BOOT_ARGS: &str = "rd=md0 nand-enable-reformat=1 -progress -restore";

/// Commands after which iBoot stops answering; they go with bRequest 1.
const NO_REPLY_COMMANDS: [&str; 3] = ["go", "bootx", "reset"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecoveryError {
    #[error("iBoot command is empty")]
    EmptyCommand,
    #[error("iBoot command is {len} characters long; iBoot accepts at most 255: {preview}…")]
    CommandTooLong { len: usize, preview: String },
    #[error("iBoot command contains a NUL byte, which would cut it short: {0:?}")]
    NulInCommand(String),
    #[error("iBoot gave an empty reply where a return value was expected")]
    EmptyReturn,
}

/// One USB transfer of the recovery protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryTransfer {
    ControlOut {
        setup: ControlSetup,
        data: Vec<u8>,
        timeout: Duration,
    },
    ControlIn {
        setup: ControlSetup,
        length: u16,
    },
    /// Bulk OUT of `range` of the file being uploaded (an empty range is a zero-length packet).
    BulkOut {
        endpoint: u8,
        range: Range<usize>,
    },
    /// Bulk IN of up to `length` bytes.
    BulkIn {
        endpoint: u8,
        length: usize,
        timeout: Duration,
    },
    /// Claim `interface` with alternate setting `alt_setting`.
    SetInterface {
        interface: u8,
        alt_setting: u8,
    },
}

/// `40/bReq 0 0 len` with the command text and a NUL.
pub fn command(text: &str) -> Result<RecoveryTransfer, RecoveryError> {
    if text.is_empty() {
        return Err(RecoveryError::EmptyCommand);
    }
    if text.len() > MAX_COMMAND_LEN {
        return Err(RecoveryError::CommandTooLong {
            len: text.len(),
            preview: text.chars().take(40).collect(),
        });
    }
    if text.contains('\0') {
        return Err(RecoveryError::NulInCommand(text.to_string()));
    }
    let first_word = text.split(' ').next().unwrap_or(text);
    let b_request = u8::from(NO_REPLY_COMMANDS.contains(&first_word));
    let mut data = Vec::with_capacity(text.len() + 1);
    data.extend_from_slice(text.as_bytes());
    data.push(0);
    Ok(RecoveryTransfer::ControlOut {
        setup: ControlSetup::new(0x40, b_request, 0, 0),
        data,
        timeout: DEFAULT_TIMEOUT,
    })
}

/// `C0/00 0 0 255`: fetch the reply of the preceding `getenv` (or the return value, `getret`).
pub fn read_reply() -> RecoveryTransfer {
    RecoveryTransfer::ControlIn {
        setup: ControlSetup::new(0xC0, 0, 0, 0),
        length: REPLY_LENGTH,
    }
}

/// `getenv NAME` command followed by the reply read.
pub fn getenv(name: &str) -> Result<[RecoveryTransfer; 2], RecoveryError> {
    Ok([command(&format!("getenv {name}"))?, read_reply()])
}

pub fn setenv(name: &str, value: &str) -> Result<RecoveryTransfer, RecoveryError> {
    command(&format!("setenv {name} {value}"))
}

/// Non-persistent setenv (survives until the next boot only).
pub fn setenvnp(name: &str, value: &str) -> Result<RecoveryTransfer, RecoveryError> {
    command(&format!("setenvnp {name} {value}"))
}

pub fn saveenv() -> RecoveryTransfer {
    // "saveenv" is a valid command by construction: short, no NUL.
    command("saveenv").expect("constant command is valid")
}

/// The environment value in a getenv reply: bytes up to the first NUL (the whole reply if none),
/// as text (invalid UTF-8 replaced, iBoot only sends ASCII).
pub fn parse_env_reply(reply: &[u8]) -> String {
    let end = reply.iter().position(|&b| b == 0).unwrap_or(reply.len());
    String::from_utf8_lossy(&reply[..end]).into_owned()
}

/// The return value in a getret reply: its first byte.
pub fn parse_getret(reply: &[u8]) -> Result<u8, RecoveryError> {
    reply.first().copied().ok_or(RecoveryError::EmptyReturn)
}

/// The transfers that upload a file of `len` bytes: `41/00 0 0 0`, then bulk OUT 0x04 in
/// 0x8000-byte chunks, then a zero-length packet when `len` is a multiple of 512 (so iBoot sees
/// the end of the transfer).
pub fn upload(len: usize) -> Vec<RecoveryTransfer> {
    let mut out = Vec::with_capacity(2 + len / UPLOAD_CHUNK);
    out.push(RecoveryTransfer::ControlOut {
        setup: ControlSetup::new(0x41, 0, 0, 0),
        data: Vec::new(),
        timeout: DEFAULT_TIMEOUT,
    });
    let mut start = 0;
    while start < len {
        let end = (start + UPLOAD_CHUNK).min(len);
        out.push(RecoveryTransfer::BulkOut {
            endpoint: UPLOAD_ENDPOINT,
            range: start..end,
        });
        start = end;
    }
    if len % UPLOAD_ZLP_MULTIPLE == 0 {
        out.push(RecoveryTransfer::BulkOut {
            endpoint: UPLOAD_ENDPOINT,
            range: len..len,
        });
    }
    out
}

/// One console read (libirecovery `irecv_receive`): switch to interface 1 alt 1, read bulk IN
/// 0x81 (repeat the read while it returns data), then back to interface 0 alt 0.
pub fn console_read() -> [RecoveryTransfer; 3] {
    [
        RecoveryTransfer::SetInterface {
            interface: CONSOLE_INTERFACE,
            alt_setting: CONSOLE_ALT_SETTING,
        },
        RecoveryTransfer::BulkIn {
            endpoint: CONSOLE_ENDPOINT,
            length: CONSOLE_READ_LEN,
            timeout: CONSOLE_TIMEOUT,
        },
        RecoveryTransfer::SetInterface {
            interface: 0,
            alt_setting: 0,
        },
    ]
}

/// The zero-length `21/01 0 0 0` (5000 ms) idevicerestore sends after RestoreKernelCache.
pub fn kernelcache_notify() -> RecoveryTransfer {
    RecoveryTransfer::ControlOut {
        setup: ControlSetup::new(0x21, 1, 0, 0),
        data: Vec::new(),
        timeout: KERNELCACHE_NOTIFY_TIMEOUT,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(b_request: u8, data: &[u8]) -> RecoveryTransfer {
        RecoveryTransfer::ControlOut {
            setup: ControlSetup::new(0x40, b_request, 0, 0),
            data: data.to_vec(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    #[test]
    fn commands_are_ascii_plus_nul() {
        assert_eq!(command("saveenv").unwrap(), out(0, b"saveenv\0"));
        assert_eq!(
            setenv("auto-boot", "false").unwrap(),
            out(0, b"setenv auto-boot false\0")
        );
        assert_eq!(
            setenvnp("boot-args", RESTORE_BOOT_ARGS).unwrap(),
            out(
                0,
                b"setenvnp boot-args rd=md0 nand-enable-reformat=1 -progress -restore\0"
            )
        );
        assert_eq!(saveenv(), out(0, b"saveenv\0"));
        assert_eq!(
            command("bgcolor 0 0 0").unwrap(),
            out(0, b"bgcolor 0 0 0\0")
        );
    }

    #[test]
    fn go_bootx_reset_use_brequest_1() {
        assert_eq!(command("go").unwrap(), out(1, b"go\0"));
        assert_eq!(command("bootx").unwrap(), out(1, b"bootx\0"));
        assert_eq!(command("reset").unwrap(), out(1, b"reset\0"));
        // Only the exact words: a longer word that merely starts like one is an ordinary command.
        assert_eq!(command("gofast").unwrap(), out(0, b"gofast\0"));
        assert_eq!(command("reboot").unwrap(), out(0, b"reboot\0"));
    }

    #[test]
    fn command_length_limits() {
        let ok = "a".repeat(255);
        match command(&ok).unwrap() {
            RecoveryTransfer::ControlOut { data, .. } => assert_eq!(data.len(), 256),
            other => panic!("unexpected {other:?}"),
        }
        let long = "a".repeat(256);
        assert!(matches!(
            command(&long),
            Err(RecoveryError::CommandTooLong { len: 256, .. })
        ));
        assert_eq!(command(""), Err(RecoveryError::EmptyCommand));
        assert!(matches!(
            command("set\0x"),
            Err(RecoveryError::NulInCommand(_))
        ));
    }

    #[test]
    fn getenv_is_command_then_c0_read() {
        let [cmd, read] = getenv("boot-stage").unwrap();
        assert_eq!(cmd, out(0, b"getenv boot-stage\0"));
        assert_eq!(
            read,
            RecoveryTransfer::ControlIn {
                setup: ControlSetup::new(0xC0, 0, 0, 0),
                length: 255
            }
        );
    }

    #[test]
    fn env_and_ret_replies() {
        assert_eq!(parse_env_reply(b"1\0garbage"), "1");
        assert_eq!(parse_env_reply(b"25C56"), "25C56");
        assert_eq!(parse_env_reply(b""), "");
        assert_eq!(parse_env_reply(b"\0"), "");
        assert_eq!(parse_env_reply(&[0xFF, b'x', 0]), "\u{FFFD}x");
        assert_eq!(parse_getret(&[7, 1, 2]), Ok(7));
        assert_eq!(parse_getret(&[]), Err(RecoveryError::EmptyReturn));
    }

    fn bulk(range: Range<usize>) -> RecoveryTransfer {
        RecoveryTransfer::BulkOut {
            endpoint: 0x04,
            range,
        }
    }
    fn start() -> RecoveryTransfer {
        RecoveryTransfer::ControlOut {
            setup: ControlSetup::new(0x41, 0, 0, 0),
            data: vec![],
            timeout: DEFAULT_TIMEOUT,
        }
    }

    #[test]
    fn upload_chunks_and_zlp() {
        assert_eq!(upload(100), vec![start(), bulk(0..100)]);
        assert_eq!(upload(512), vec![start(), bulk(0..512), bulk(512..512)]);
        assert_eq!(upload(513), vec![start(), bulk(0..513)]);
        assert_eq!(
            upload(0x8000),
            vec![start(), bulk(0..0x8000), bulk(0x8000..0x8000)]
        );
        assert_eq!(
            upload(0x8000 + 1),
            vec![start(), bulk(0..0x8000), bulk(0x8000..0x8001)]
        );
        assert_eq!(
            upload(2 * 0x8000 + 1024),
            vec![
                start(),
                bulk(0..0x8000),
                bulk(0x8000..0x10000),
                bulk(0x10000..0x10400),
                bulk(0x10400..0x10400)
            ]
        );
    }

    #[test]
    fn console_read_switches_to_interface_1_alt_1() {
        assert_eq!(
            console_read(),
            [
                RecoveryTransfer::SetInterface {
                    interface: 1,
                    alt_setting: 1
                },
                RecoveryTransfer::BulkIn {
                    endpoint: 0x81,
                    length: 4096,
                    timeout: Duration::from_millis(500)
                },
                RecoveryTransfer::SetInterface {
                    interface: 0,
                    alt_setting: 0
                },
            ]
        );
    }

    #[test]
    fn kernelcache_notify_is_zero_length_21_01_with_5s() {
        assert_eq!(
            kernelcache_notify(),
            RecoveryTransfer::ControlOut {
                setup: ControlSetup::new(0x21, 1, 0, 0),
                data: vec![],
                timeout: Duration::from_millis(5000)
            }
        );
    }
}
