//! SNTPv4 (RFC 4330), sans-IO: build a request, check a reply, compute the corrected time.
//! Only the client side; [`super::clock`] sends it and sets the clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const PACKET_LEN: usize = 48;
pub const PORT: u16 = 123;
/// Seconds from the NTP era 0 epoch (1900) to the Unix epoch.
const NTP_UNIX_OFFSET: u64 = 2_208_988_800;
const MODE_CLIENT: u8 = 3;
const MODE_SERVER: u8 = 4;
const VERSION: u8 = 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SntpError {
    #[error("the time server's reply is not an SNTP server packet ({0})")]
    Malformed(&'static str),
    #[error("the time server's reply does not answer our request (spoofed or stale)")]
    Mismatch,
    #[error(
        "the time server is not synchronised (stratum {stratum}, leap {leap}); try another server"
    )]
    Unsynchronised { stratum: u8, leap: u8 },
    #[error("the time server asked us to go away (kiss code {0}); try another server")]
    Kiss(String),
    #[error("the time server says {server_unix}s since 1970, before this agent was built ({floor_unix}s): refusing it")]
    BeforeBuild { server_unix: u64, floor_unix: u64 },
    #[error("the time server would move the clock back {years} years; refusing it")]
    BackInTime { years: u64 },
}

/// A 64-bit NTP timestamp (seconds since 1900 and a binary fraction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub fn from_system(t: SystemTime) -> Self {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = d.as_secs().wrapping_add(NTP_UNIX_OFFSET) & 0xffff_ffff;
        let frac = (u64::from(d.subsec_nanos()) << 32) / 1_000_000_000;
        Self((secs << 32) | frac)
    }

    /// Interprets era 0 timestamps; values before 1968 are taken as era 1 (after 2036), the
    /// RFC 4330 §3 convention.
    pub fn to_system(self) -> SystemTime {
        let secs = self.0 >> 32;
        let frac = self.0 & 0xffff_ffff;
        let secs = if secs & 0x8000_0000 == 0 {
            secs + (1 << 32)
        } else {
            secs
        };
        let nanos = (frac * 1_000_000_000) >> 32;
        UNIX_EPOCH
            + Duration::from_secs(secs.saturating_sub(NTP_UNIX_OFFSET))
            + Duration::from_nanos(nanos)
    }
}

/// The client request; `transmit` is our clock now and is echoed back as the origin.
pub fn request(transmit: Timestamp) -> [u8; PACKET_LEN] {
    let mut p = [0u8; PACKET_LEN];
    p[0] = (VERSION << 3) | MODE_CLIENT;
    p[40..48].copy_from_slice(&transmit.0.to_be_bytes());
    p
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub leap: u8,
    pub stratum: u8,
    pub origin: Timestamp,
    pub receive: Timestamp,
    pub transmit: Timestamp,
}

impl Reply {
    pub fn parse(b: &[u8]) -> Result<Self, SntpError> {
        if b.len() < PACKET_LEN {
            return Err(SntpError::Malformed("shorter than 48 bytes"));
        }
        let ts = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            Timestamp(u64::from_be_bytes(a))
        };
        if b[0] & 7 != MODE_SERVER {
            return Err(SntpError::Malformed("not in server mode"));
        }
        if !(1..=4).contains(&((b[0] >> 3) & 7)) {
            return Err(SntpError::Malformed("unknown version"));
        }
        let r = Self {
            leap: b[0] >> 6,
            stratum: b[1],
            origin: ts(24),
            receive: ts(32),
            transmit: ts(40),
        };
        if r.stratum == 0 {
            let code = String::from_utf8_lossy(&b[12..16])
                .trim_end_matches('\0')
                .to_owned();
            return Err(SntpError::Kiss(code));
        }
        Ok(r)
    }

    /// Encodes a server reply (used by tests and simulated servers).
    pub fn emit(&self) -> [u8; PACKET_LEN] {
        let mut p = [0u8; PACKET_LEN];
        p[0] = (self.leap << 6) | (VERSION << 3) | MODE_SERVER;
        p[1] = self.stratum;
        p[24..32].copy_from_slice(&self.origin.0.to_be_bytes());
        p[32..40].copy_from_slice(&self.receive.0.to_be_bytes());
        p[40..48].copy_from_slice(&self.transmit.0.to_be_bytes());
        p
    }
}

/// Checks `reply` against our request and returns the corrected current time.
///
/// `sent`/`received` are our clock when the request left and the reply arrived; `floor` is the
/// earliest believable time (the build date).
pub fn corrected_time(
    reply: &Reply,
    sent: Timestamp,
    sent_at: SystemTime,
    received_at: SystemTime,
    floor: SystemTime,
) -> Result<SystemTime, SntpError> {
    if reply.origin != sent {
        return Err(SntpError::Mismatch);
    }
    if reply.leap == 3 || !(1..=15).contains(&reply.stratum) {
        return Err(SntpError::Unsynchronised {
            stratum: reply.stratum,
            leap: reply.leap,
        });
    }
    if reply.transmit.0 == 0 {
        return Err(SntpError::Malformed("no transmit timestamp"));
    }
    // Without a trustworthy local clock the offset formula gains nothing: take the server's
    // transmit time plus half the round trip measured on our (monotonic-enough) clock.
    let rtt = received_at.duration_since(sent_at).unwrap_or_default();
    let server_now = reply.transmit.to_system() + rtt / 2;
    let unix = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    };
    if server_now < floor {
        return Err(SntpError::BeforeBuild {
            server_unix: unix(server_now),
            floor_unix: unix(floor),
        });
    }
    // A clock already past the build date is roughly right; a server moving it back by more
    // than a year is more likely wrong (or hostile) than the clock.
    if received_at > floor {
        if let Ok(back) = received_at.duration_since(server_now) {
            let years = back.as_secs() / (365 * 86_400);
            if years >= 1 {
                return Err(SntpError::BackInTime { years });
            }
        }
    }
    Ok(server_now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(unix: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(unix)
    }

    const FLOOR: u64 = 1_767_225_600; // 2026-01-01
    const NOW: u64 = 1_800_000_000; // 2027-01-15

    fn reply_to(sent: Timestamp, server: u64) -> Reply {
        Reply {
            leap: 0,
            stratum: 2,
            origin: sent,
            receive: Timestamp::from_system(at(server)),
            transmit: Timestamp::from_system(at(server)),
        }
    }

    #[test]
    fn request_bytes() {
        let p = request(Timestamp(0x0102_0304_0506_0708));
        assert_eq!(p[0], 0x23);
        assert_eq!(&p[1..40], &[0u8; 39][..]);
        assert_eq!(&p[40..], &[1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn timestamps_round_trip_and_handle_era_1() {
        assert_eq!(Timestamp::from_system(at(0)).0 >> 32, NTP_UNIX_OFFSET);
        for s in [FLOOR, NOW, 2_085_978_496 + 10, 3_000_000_000] {
            assert_eq!(Timestamp::from_system(at(s)).to_system(), at(s), "{s}");
        }
    }

    #[test]
    fn sets_a_clock_stuck_in_1970() {
        let sent = Timestamp::from_system(at(5));
        let r = Reply::parse(&reply_to(sent, NOW).emit()).unwrap();
        let t = corrected_time(&r, sent, at(5), at(7), at(FLOOR)).unwrap();
        assert_eq!(t, at(NOW + 1));
    }

    #[test]
    fn sanity_checks() {
        let sent = Timestamp::from_system(at(NOW));
        let check = |r: Reply| corrected_time(&r, sent, at(NOW), at(NOW), at(FLOOR));
        assert_eq!(check(reply_to(Timestamp(1), NOW)), Err(SntpError::Mismatch));
        assert_eq!(
            check(Reply {
                leap: 3,
                ..reply_to(sent, NOW)
            }),
            Err(SntpError::Unsynchronised {
                stratum: 2,
                leap: 3
            })
        );
        assert_eq!(
            check(Reply {
                stratum: 16,
                ..reply_to(sent, NOW)
            }),
            Err(SntpError::Unsynchronised {
                stratum: 16,
                leap: 0
            })
        );
        assert_eq!(
            check(reply_to(sent, FLOOR - 10)),
            Err(SntpError::BeforeBuild {
                server_unix: FLOOR - 10,
                floor_unix: FLOOR
            })
        );
        assert_eq!(
            corrected_time(
                &reply_to(sent, FLOOR + 10),
                sent,
                at(NOW),
                at(NOW),
                at(FLOOR)
            ),
            Err(SntpError::BackInTime { years: 1 })
        );
        // A small step back is fine.
        assert_eq!(check(reply_to(sent, NOW - 3600)), Ok(at(NOW - 3600)));
    }

    #[test]
    fn parse_errors() {
        let sent = Timestamp(9);
        let mut b = reply_to(sent, NOW).emit();
        assert!(matches!(
            Reply::parse(&b[..47]),
            Err(SntpError::Malformed(_))
        ));
        b[0] = 0x23;
        assert!(matches!(Reply::parse(&b), Err(SntpError::Malformed(_))));
        let mut b = reply_to(sent, NOW).emit();
        b[1] = 0;
        b[12..16].copy_from_slice(b"RATE");
        assert_eq!(Reply::parse(&b), Err(SntpError::Kiss("RATE".into())));
    }
}
