//! Is this HTTP response the bytes we asked for? Sans-IO checks of status and headers, and the
//! HTML sniffing that catches a CDN's error page served with status 200.

use super::ranges::ByteRange;

/// The parts of a response head the checks look at.
#[derive(Debug, Clone, Default)]
pub struct ResponseHead {
    pub status: u16,
    pub content_type: Option<String>,
    pub content_length: Option<u64>,
    pub content_range: Option<String>,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

/// What is wrong with a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// A web page instead of file bytes: text/html, `<html` at the start of a part, or a 200
    /// answer whose size is not the file's.
    Html,
    /// 5xx, 429, 408: the server is busy; try again.
    Busy(u16),
    /// Any other unexpected status (404, 403, …): retrying will not help.
    Status(u16),
    /// The file on the server is not the one being downloaded any more.
    Changed { why: String },
    /// The server answered a range request with the whole file.
    RangeIgnored,
    /// A range answer that does not match the request.
    WrongRange { why: String },
    /// The body ended before the promised length.
    Short { expected: u64, got: u64 },
}

impl Problem {
    /// Worth another attempt (possibly after backoff) rather than failing the download.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Problem::Html | Problem::Busy(_) | Problem::Short { .. } | Problem::WrongRange { .. }
        )
    }
}

/// The file as the server describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    pub size: u64,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

fn is_html(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|t| {
        let t = t.trim().to_ascii_lowercase();
        t.starts_with("text/html") || t.starts_with("application/xhtml")
    })
}

fn status_problem(status: u16) -> Problem {
    match status {
        408 | 429 | 500..=599 => Problem::Busy(status),
        _ => Problem::Status(status),
    }
}

/// The answer to the initial HEAD: size and validators of the file.
pub fn check_head(h: &ResponseHead) -> Result<Option<RemoteFile>, Problem> {
    if h.status != 200 {
        return Err(status_problem(h.status));
    }
    if is_html(h.content_type.as_deref()) {
        return Err(Problem::Html);
    }
    // No length: the caller asks for one byte and reads the total from Content-Range.
    Ok(h.content_length.map(|size| RemoteFile {
        size,
        etag: h.etag.clone(),
        last_modified: h.last_modified.clone(),
    }))
}

/// `bytes a-b/total` → (a, b + 1, total); total `*` is None.
pub fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (span, total) = rest.split_once('/')?;
    let (a, b) = span.trim().split_once('-')?;
    let a: u64 = a.trim().parse().ok()?;
    let b: u64 = b.trim().parse().ok()?;
    if b < a {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((a, b.checked_add(1)?, total))
}

/// The answer to `Range: bytes=<asked>` for a file described by `file`.
pub fn check_part(h: &ResponseHead, asked: ByteRange, file: &RemoteFile) -> Result<(), Problem> {
    match h.status {
        206 => {}
        200 => {
            if is_html(h.content_type.as_deref()) {
                return Err(Problem::Html);
            }
            if h.content_length != Some(file.size) {
                // Not the file at all, whatever its Content-Type says: an error page.
                return Err(Problem::Html);
            }
            if asked.start == 0 && asked.end == file.size {
                return Ok(());
            }
            return Err(Problem::RangeIgnored);
        }
        416 => {
            return Err(Problem::Changed {
                why: format!(
                    "the server refuses bytes {}-{} of a file it said has {} bytes",
                    asked.start,
                    asked.end - 1,
                    file.size
                ),
            })
        }
        s => return Err(status_problem(s)),
    }
    if is_html(h.content_type.as_deref()) {
        return Err(Problem::Html);
    }
    if let (Some(want), Some(got)) = (&file.etag, &h.etag) {
        if want != got {
            return Err(Problem::Changed {
                why: format!("its ETag changed from {want} to {got}"),
            });
        }
    }
    let Some((a, b, total)) = h.content_range.as_deref().and_then(parse_content_range) else {
        return Err(Problem::WrongRange {
            why: "a 206 answer without a valid Content-Range".into(),
        });
    };
    if let Some(t) = total.filter(|t| *t != file.size) {
        return Err(Problem::Changed {
            why: format!("its size changed from {} to {t} bytes", file.size),
        });
    }
    if (a, b) != (asked.start, asked.end) {
        return Err(Problem::WrongRange {
            why: format!(
                "asked for bytes {}-{}, got {a}-{}",
                asked.start,
                asked.end - 1,
                b - 1
            ),
        });
    }
    if let Some(len) = h.content_length.filter(|l| *l != asked.len()) {
        return Err(Problem::WrongRange {
            why: format!("Content-Length {len} for a {}-byte range", asked.len()),
        });
    }
    Ok(())
}

/// Does a part begin like a web page? Firmware (a ZIP) never does at a part boundary in
/// practice, while CDN error pages always do.
pub fn looks_like_html(first: &[u8]) -> bool {
    let s = first
        .strip_prefix(b"\xEF\xBB\xBF")
        .unwrap_or(first)
        .trim_ascii_start();
    let n = s.len().min(16);
    let head = s[..n].to_ascii_lowercase();
    head.starts_with(b"<html") || head.starts_with(b"<!doctype html") || head.starts_with(b"<head")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> RemoteFile {
        RemoteFile {
            size: 1000,
            etag: Some("\"a\"".into()),
            last_modified: None,
        }
    }

    fn part(range: &str, len: u64) -> ResponseHead {
        ResponseHead {
            status: 206,
            content_type: Some("application/octet-stream".into()),
            content_length: Some(len),
            content_range: Some(range.into()),
            etag: Some("\"a\"".into()),
            last_modified: None,
        }
    }

    #[test]
    fn content_ranges_parse() {
        assert_eq!(
            parse_content_range("bytes 0-99/1000"),
            Some((0, 100, Some(1000)))
        );
        assert_eq!(parse_content_range("bytes 5-5/*"), Some((5, 6, None)));
        assert_eq!(parse_content_range("bytes 9-5/10"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
        assert_eq!(parse_content_range("bytes 0-18446744073709551615/1"), None);
    }

    #[test]
    fn a_matching_part_passes() {
        let r = ByteRange::new(100, 200);
        assert_eq!(
            check_part(&part("bytes 100-199/1000", 100), r, &file()),
            Ok(())
        );
    }

    #[test]
    fn html_with_200_is_named() {
        let h = ResponseHead {
            status: 200,
            content_type: Some("text/html; charset=UTF-8".into()),
            content_length: Some(180),
            ..ResponseHead::default()
        };
        assert_eq!(
            check_part(&h, ByteRange::new(0, 100), &file()),
            Err(Problem::Html)
        );
        assert_eq!(check_head(&h), Err(Problem::Html));
    }

    #[test]
    fn range_mismatches() {
        let r = ByteRange::new(100, 200);
        assert!(matches!(
            check_part(&part("bytes 0-99/1000", 100), r, &file()),
            Err(Problem::WrongRange { .. })
        ));
        assert!(matches!(
            check_part(&part("bytes 100-199/2000", 100), r, &file()),
            Err(Problem::Changed { .. })
        ));
        assert!(matches!(
            check_part(&part("bytes 100-199/1000", 50), r, &file()),
            Err(Problem::WrongRange { .. })
        ));
        let mut other = part("bytes 100-199/1000", 100);
        other.etag = Some("\"b\"".into());
        assert!(matches!(
            check_part(&other, r, &file()),
            Err(Problem::Changed { .. })
        ));
    }

    #[test]
    fn whole_file_answers() {
        let h = ResponseHead {
            status: 200,
            content_length: Some(1000),
            ..ResponseHead::default()
        };
        assert_eq!(check_part(&h, ByteRange::new(0, 1000), &file()), Ok(()));
        assert_eq!(
            check_part(&h, ByteRange::new(0, 500), &file()),
            Err(Problem::RangeIgnored)
        );
        // A 200 of another size is a page, not the file, even as application/octet-stream.
        let page = ResponseHead {
            status: 200,
            content_type: Some("application/octet-stream".into()),
            content_length: Some(212),
            ..ResponseHead::default()
        };
        assert_eq!(
            check_part(&page, ByteRange::new(0, 500), &file()),
            Err(Problem::Html)
        );
    }

    #[test]
    fn statuses_are_classified() {
        let h = |status| ResponseHead {
            status,
            ..ResponseHead::default()
        };
        let r = ByteRange::new(0, 10);
        assert_eq!(check_part(&h(503), r, &file()), Err(Problem::Busy(503)));
        assert_eq!(check_part(&h(429), r, &file()), Err(Problem::Busy(429)));
        assert_eq!(check_part(&h(404), r, &file()), Err(Problem::Status(404)));
        assert!(Problem::Busy(503).is_transient());
        assert!(!Problem::Status(404).is_transient());
        assert!(matches!(
            check_part(&h(416), r, &file()),
            Err(Problem::Changed { .. })
        ));
    }

    #[test]
    fn head_answers() {
        let h = ResponseHead {
            status: 200,
            content_length: Some(5),
            etag: Some("\"x\"".into()),
            ..ResponseHead::default()
        };
        assert_eq!(
            check_head(&h),
            Ok(Some(RemoteFile {
                size: 5,
                etag: Some("\"x\"".into()),
                last_modified: None
            }))
        );
    }

    #[test]
    fn html_sniffing() {
        assert!(looks_like_html(b"<html><body>"));
        assert!(looks_like_html(b"\r\n  <!DOCTYPE HTML PUBLIC"));
        assert!(looks_like_html(b"\xEF\xBB\xBF<HTML>"));
        assert!(!looks_like_html(b"PK\x03\x04"));
        assert!(!looks_like_html(b""));
        assert!(!looks_like_html(b"<ht"));
    }
}
