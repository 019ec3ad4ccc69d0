//! Reading the signing server's reply (§4.1):
//! `STATUS=<int>&MESSAGE=<text>&REQUEST_STRING=<?xml … plist>`.

use std::io::Cursor;

use plist::{Dictionary, Value};

use super::TssError;
use crate::img4::TbmData;

/// A successful reply: the ticket dictionary and the status line it came with.
#[derive(Debug, Clone, PartialEq)]
pub struct TssResponse {
    pub status: i64,
    pub message: String,
    pub tickets: Dictionary,
}

impl TssResponse {
    /// A data item of the reply (e.g. `ApImg4Ticket`, `Cryptex1,Ticket`).
    pub fn ticket(&self, key: &str) -> Result<&[u8], TssError> {
        self.tickets
            .get(key)
            .and_then(Value::as_data)
            .ok_or_else(|| TssError::MissingTicket(key.to_string()))
    }

    /// The main AP ticket (an IM4M).
    pub fn ap_img4_ticket(&self) -> Result<&[u8], TssError> {
        self.ticket("ApImg4Ticket")
    }

    /// `<component>-TBM` {ucon, ucer}, which feeds that component's IM4R.
    pub fn tbm(&self, component: &str) -> Option<TbmData> {
        let tbm = self
            .tickets
            .get(&format!("{component}-TBM"))?
            .as_dictionary()?;
        Some(TbmData {
            ucon: tbm.get("ucon")?.as_data()?.to_vec(),
            ucer: tbm.get("ucer")?.as_data()?.to_vec(),
        })
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The text of `KEY=` up to the next `&` (or the end).
fn field<'a>(body: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let start = find(body, key)? + key.len();
    let rest = &body[start..];
    let end = rest.iter().position(|&b| b == b'&').unwrap_or(rest.len());
    Some(&rest[..end])
}

/// Parse a raw HTTP response body. Never panics, whatever the bytes.
pub fn parse_response(body: &[u8]) -> Result<TssResponse, TssError> {
    let Some(status_text) = field(body, b"STATUS=") else {
        return Err(TssError::NoStatus);
    };
    let status_text = String::from_utf8_lossy(status_text);
    let status: i64 = status_text.trim().parse().map_err(|_| {
        TssError::GarbledResponse(format!("STATUS is not a number: {status_text:?}"))
    })?;
    let message = field(body, b"MESSAGE=")
        .map(|m| String::from_utf8_lossy(m).trim().to_string())
        .unwrap_or_default();
    if message != "SUCCESS" {
        tracing::warn!(status, message = %message, "TSS request refused");
        return Err(match status {
            69 | 94 => TssError::NotSigned { status, message },
            100 | 126 => TssError::MalformedRequest { status, message },
            8 | 49 => TssError::ServerError { status, message },
            _ => TssError::Refused { status, message },
        });
    }
    let xml_start = find(body, b"<?xml")
        .ok_or_else(|| TssError::GarbledResponse("no ticket plist after SUCCESS".into()))?;
    let value = Value::from_reader_xml(Cursor::new(&body[xml_start..]))
        .map_err(|e| TssError::GarbledResponse(format!("ticket plist: {e}")))?;
    let tickets = value
        .into_dictionary()
        .ok_or_else(|| TssError::GarbledResponse("ticket plist is not a dictionary".into()))?;
    Ok(TssResponse {
        status,
        message,
        tickets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLIST: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<plist version=\"1.0\"><dict>\
        <key>ApImg4Ticket</key><data>MAA=</data>\
        <key>SEP-TBM</key><dict><key>ucon</key><data>AQ==</data><key>ucer</key><data>Ag==</data></dict>\
        </dict></plist>";

    #[test]
    fn success() {
        let body = format!("STATUS=0&MESSAGE=SUCCESS&REQUEST_STRING={PLIST}");
        let r = parse_response(body.as_bytes()).unwrap();
        assert_eq!(r.status, 0);
        assert_eq!(r.ap_img4_ticket().unwrap(), &[0x30, 0x00]);
        assert_eq!(
            r.tbm("SEP"),
            Some(TbmData {
                ucon: vec![1],
                ucer: vec![2]
            })
        );
        assert_eq!(r.tbm("RestoreSEP"), None);
        assert!(matches!(
            r.ticket("Cryptex1,Ticket"),
            Err(TssError::MissingTicket(k)) if k == "Cryptex1,Ticket"
        ));
    }

    #[test]
    fn status_codes_map_to_causes() {
        let refused =
            |s: &str| parse_response(format!("STATUS={s}&MESSAGE=Nope").as_bytes()).unwrap_err();
        assert!(
            matches!(refused("94"), TssError::NotSigned { status: 94, ref message } if message == "Nope")
        );
        assert!(matches!(
            refused("69"),
            TssError::NotSigned { status: 69, .. }
        ));
        assert!(matches!(
            refused("100"),
            TssError::MalformedRequest { status: 100, .. }
        ));
        assert!(matches!(refused("126"), TssError::MalformedRequest { .. }));
        assert!(matches!(refused("8"), TssError::ServerError { .. }));
        assert!(matches!(refused("49"), TssError::ServerError { .. }));
        assert!(matches!(refused("3"), TssError::Refused { status: 3, .. }));
        assert!(matches!(refused("x"), TssError::GarbledResponse(_)));
        assert!(!refused("94").is_retryable());
        let net = parse_response(b"<html>502 Bad Gateway</html>").unwrap_err();
        assert!(matches!(net, TssError::NoStatus));
        assert!(net.is_retryable());
        assert!(matches!(parse_response(b""), Err(TssError::NoStatus)));
    }

    #[test]
    fn garbage_after_success() {
        for body in [
            &b"STATUS=0&MESSAGE=SUCCESS"[..],
            b"STATUS=0&MESSAGE=SUCCESS&REQUEST_STRING=<?xml garbage",
            b"STATUS=0&MESSAGE=SUCCESS&REQUEST_STRING=<?xml version=\"1.0\"?><plist><array/></plist>",
            b"STATUS=0&MESSAGE=SUCCESS&REQUEST_STRING=<?xml\xff\xfe\x00",
        ] {
            assert!(
                matches!(parse_response(body), Err(TssError::GarbledResponse(_))),
                "{body:?}"
            );
        }
    }
}
