//! Facts the HTTP client needs to talk to Apple's signing server (§4.1). Kept here, next to
//! the request/response code, so the client stays a thin edge.

use std::time::Duration;

/// Servers tried in turn, one per attempt, when no explicit server is configured.
pub const SERVER_URLS: [&str; 6] = [
    "https://gs.apple.com/TSS/controller?action=2",
    "https://gs.apple.com.akadns.net/TSS/controller?action=2",
    "https://gs.apple.com.v.aaplimg.com/TSS/controller?action=2",
    "http://gs.apple.com/TSS/controller?action=2",
    "http://gs.apple.com.akadns.net/TSS/controller?action=2",
    "http://gs.apple.com.v.aaplimg.com/TSS/controller?action=2",
];

/// Request headers. The empty `Expect` suppresses `100-continue`.
pub const HEADERS: [(&str, &str); 4] = [
    ("Cache-Control", "no-cache"),
    ("Content-type", "text/xml; charset=\"utf-8\""),
    ("Expect", ""),
    ("User-Agent", "InetURL/1.0"),
];

/// Attempts made when the server gives no STATUS at all (network failure).
pub const MAX_ATTEMPTS: usize = 15;

/// Pause between attempts.
pub const RETRY_DELAY: Duration = Duration::from_secs(2);

/// The URL for attempt `n` (0-based), rotating through [`SERVER_URLS`].
pub fn url_for_attempt(n: usize) -> &'static str {
    SERVER_URLS[n % SERVER_URLS.len()]
}

/// The URL to use for a user-given server: a bare host gets the TSS path appended.
pub fn server_url(custom: &str) -> String {
    let after_scheme = custom.split_once("://").map_or(custom, |(_, rest)| rest);
    if after_scheme.contains('/') {
        custom.to_string()
    } else {
        format!("{custom}/TSS/controller?action=2")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_and_custom_servers() {
        assert_eq!(url_for_attempt(0), SERVER_URLS[0]);
        assert_eq!(url_for_attempt(7), SERVER_URLS[1]);
        assert_eq!(
            server_url("http://tss.local:8080"),
            "http://tss.local:8080/TSS/controller?action=2"
        );
        assert_eq!(server_url("http://x/y"), "http://x/y");
    }
}
