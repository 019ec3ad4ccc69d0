//! Device side of the reverse-proxy control channel on port 1082 (protocol.md §7.10): the host
//! connects, says BeginCtrl (v2) or HelloCtrl (v1), learns the connection port; with `ping`
//! the device then asks for one connection channel and pings it.

use std::time::Duration;

use plist::{Dictionary, Value};

use super::link::{MuxLink, Stream};

pub const CTRL_PORT: u16 = 1082;
pub const CONN_PORT: u16 = 1083;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyReport {
    /// Control protocol version the host spoke (1 or 2).
    pub ctrl_version: Option<u8>,
    pub ping_ok: bool,
    pub error: Option<String>,
}

fn read_bplist_le(s: &Stream) -> Result<Dictionary, String> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).map_err(|e| e.to_string())?;
    let len = u32::from_le_bytes(len) as usize;
    if len > 1 << 20 {
        return Err(format!("reverse proxy plist length {len} is implausible"));
    }
    let mut buf = vec![0; len];
    s.read_exact(&mut buf).map_err(|e| e.to_string())?;
    if !buf.starts_with(b"bplist00") {
        return Err("reverse proxy plists must be binary (bplist00)".into());
    }
    plist::from_bytes::<Value>(&buf)
        .map_err(|e| format!("reverse proxy plist does not parse: {e}"))?
        .into_dictionary()
        .ok_or_else(|| "reverse proxy plist is not a dictionary".into())
}

fn write_bplist_le(s: &Stream, d: Dictionary) -> Result<(), String> {
    let mut buf = Vec::new();
    plist::to_writer_binary(&mut buf, &Value::Dictionary(d)).map_err(|e| e.to_string())?;
    let mut out = (buf.len() as u32).to_le_bytes().to_vec();
    out.extend(buf);
    s.write_all(&out).map_err(|e| e.to_string())
}

/// Serve one control session; returns what the host did.
pub fn serve(link: &MuxLink, ping: bool, accept_timeout: Duration) -> ProxyReport {
    let mut rep = ProxyReport::default();
    if let Err(e) = serve_inner(link, ping, accept_timeout, &mut rep) {
        tracing::warn!("reverse proxy: {e}");
        rep.error = Some(e);
    }
    rep
}

fn serve_inner(
    link: &MuxLink,
    ping: bool,
    accept_timeout: Duration,
    rep: &mut ProxyReport,
) -> Result<(), String> {
    let ctrl = link
        .accept(CTRL_PORT, accept_timeout)
        .map_err(|e| e.to_string())?;
    let mut hello = [0u8; 10];
    ctrl.read_exact(&mut hello).map_err(|e| e.to_string())?;
    link.listen(CONN_PORT);
    match &hello {
        b"BeginCtrl\0" => {
            let d = read_bplist_le(&ctrl)?;
            if d.get("Command").and_then(Value::as_string) != Some("BeginCtrl")
                || d.get("CtrlProtoVersion")
                    .and_then(Value::as_unsigned_integer)
                    != Some(2)
            {
                return Err(format!(
                    "BeginCtrl plist must be {{Command: BeginCtrl, CtrlProtoVersion: 2}}, got {d:?}"
                ));
            }
            let mut r = Dictionary::new();
            r.insert("ConnPort".into(), Value::Integer(u64::from(CONN_PORT).into()));
            write_bplist_le(&ctrl, r)?;
            rep.ctrl_version = Some(2);
        }
        b"HelloCtrl\0" => {
            let mut out = b"HelloCtrl".to_vec();
            out.extend_from_slice(&CONN_PORT.to_le_bytes());
            ctrl.write_all(&out).map_err(|e| e.to_string())?;
            rep.ctrl_version = Some(1);
        }
        other => {
            return Err(format!(
                "reverse proxy control channel opened with {other:02x?}, expected BeginCtrl or HelloCtrl"
            ))
        }
    }
    if !ping {
        return Ok(());
    }
    ctrl.write_all(&1u32.to_le_bytes())
        .map_err(|e| e.to_string())?;
    let conn = link
        .accept(CONN_PORT, accept_timeout)
        .map_err(|e| format!("after command 1 the host never connected to {CONN_PORT}: {e}"))?;
    let mut hello = [0u8; 10];
    conn.read_exact(&mut hello).map_err(|e| e.to_string())?;
    if &hello != b"HelloConn\0" {
        return Err(format!(
            "connection channel opened with {hello:02x?}, expected HelloConn"
        ));
    }
    if rep.ctrl_version == Some(2) {
        let mut d = Dictionary::new();
        d.insert("Command".into(), Value::String("HelloConn".into()));
        d.insert("Identifier".into(), Value::String("mac-sim-1".into()));
        write_bplist_le(&conn, d)?;
    } else {
        conn.write_all(b"HelloConn\0").map_err(|e| e.to_string())?;
    }
    conn.write_all(&0xBBAAu16.to_le_bytes())
        .map_err(|e| e.to_string())?;
    let mut d = Dictionary::new();
    d.insert("Command".into(), Value::String("Ping".into()));
    write_bplist_le(&conn, d)?;
    let pong = read_bplist_le(&conn)?;
    if pong.get("Pong").and_then(Value::as_boolean) != Some(true) {
        return Err(format!(
            "Ping answered with {pong:?}, expected {{Pong: true}}"
        ));
    }
    rep.ping_ok = true;
    Ok(())
}
