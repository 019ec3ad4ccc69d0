//! The engine's [`RestoreContext`]: restore mode's tickets, identities and files, served from
//! the IPSW and the same [`Personalizer`] that personalized the boot chain (so restore mode
//! sees the tickets of the nonces the Mac actually booted with).

use std::io;
use std::sync::{Arc, Mutex};

use plist::{Dictionary, Value};
use tokio::sync::mpsc::UnboundedSender;

use crate::asr::ImageSource;
use crate::bootchain::plan::LOCAL_POLICY;
use crate::img4;
use crate::ipsw::{Ipsw, Method, RandomAccess};
use crate::personalize::{IpswSource, Personalizer, TssTransport, TssTransportError};
use crate::restored::{
    ContextError, LocalPolicyArgs, RestoreContext, RestoreEvent, UrlRequest, UrlResponse,
};
use crate::tss::{self, RecoveryOsLocalPolicyArgs, RequestUuid};
use crate::tss_client::{BlockingTssClient, TssClient};

use super::failure::RestoreTrail;
use super::EngineEvent;

/// The IPSW bytes, wherever they are. Reads made from inside the async runtime move to a
/// scoped thread: the remote reader blocks on its own runtime and refuses to run inside ours.
#[derive(Clone)]
pub struct SharedFile(pub Arc<dyn RandomAccess + Send + Sync>);

impl RandomAccess for SharedFile {
    fn len(&self) -> u64 {
        self.0.len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if tokio::runtime::Handle::try_current().is_ok() {
            let inner = &self.0;
            std::thread::scope(|s| {
                s.spawn(|| inner.read_at(offset, buf))
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("an IPSW read panicked")))
            })
        } else {
            self.0.read_at(offset, buf)
        }
    }
}

pub type EnginePersonalizer = Personalizer<IpswSource<SharedFile>, TssOffRuntime>;

/// The blocking TSS client owns a runtime, which must not be dropped on a runtime thread; the
/// personalizer is shared with async restore-mode code, so its last owner may be one.
pub struct TssOffRuntime(Option<BlockingTssClient>);

impl TssOffRuntime {
    pub fn new(client: BlockingTssClient) -> Self {
        Self(Some(client))
    }
}

impl TssTransport for TssOffRuntime {
    fn request(&mut self, request_xml: &[u8]) -> Result<Vec<u8>, TssTransportError> {
        match self.0.as_mut() {
            Some(c) => TssTransport::request(c, request_xml),
            None => Err(TssTransportError::Cancelled),
        }
    }
}

impl Drop for TssOffRuntime {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                // Dropping it here would panic; a short-lived thread drops it instead.
                let _ = std::thread::Builder::new()
                    .name("macrescue-tss-drop".into())
                    .spawn(move || drop(c));
            }
        }
    }
}

/// Runs blocking work (TSS over the blocking client, IPSW reads) on a plain thread: the
/// blocking clients refuse to run on a runtime thread, including `spawn_blocking`'s.
pub async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("macrescue-engine-io".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| format!("cannot start a worker thread: {e}"))?;
    rx.await
        .map_err(|_| "a worker thread stopped unexpectedly".to_string())
}

/// Largest compressed system image inflated into memory (test IPSWs); real IPSWs store it.
const MAX_INFLATED_OS: u64 = 256 << 20;
/// Largest IPSW file served whole to restored (kernelcaches, firmware: tens of MiB).
const MAX_RAW_FILE: u64 = 512 << 20;

pub struct EngineContext {
    pub(super) personalizer: Arc<Mutex<EnginePersonalizer>>,
    pub(super) ipsw: Arc<Ipsw<SharedFile>>,
    /// The identity the Mac booted (Update for a revive, Erase for an erase).
    pub(super) identity: Dictionary,
    /// The `macOS Customer` identity (recoveryOS), when the manifest has one.
    pub(super) recovery_identity: Option<Dictionary>,
    /// Identity for the RecoveryOSLocalPolicy ticket (§10: Erase → macOS Customer; Update →
    /// the Update identity).
    pub(super) local_policy_identity: Dictionary,
    pub(super) tss: TssClient,
    pub(super) http: reqwest::Client,
    pub(super) events: UnboundedSender<EngineEvent>,
    pub(super) trail: Mutex<RestoreTrail>,
    pub(super) checkpoints: Mutex<Vec<(String, i64)>>,
}

fn failed(e: impl std::fmt::Display) -> ContextError {
    ContextError::Failed(e.to_string())
}

pub(super) fn lock_pub<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `Ap,VolumeUUID` arrives as 16 bytes or as the UUID's text; TSS wants the text.
fn volume_uuid_text(raw: &[u8]) -> String {
    if raw.len() == 16 {
        let h = hex::encode_upper(raw);
        format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    } else {
        String::from_utf8_lossy(raw).trim().to_string()
    }
}

impl EngineContext {
    fn with_personalizer<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut EnginePersonalizer) -> Result<T, String> + Send + 'static,
    ) -> impl std::future::Future<Output = Result<T, ContextError>> + Send {
        let p = Arc::clone(&self.personalizer);
        async move {
            off_runtime(move || f(&mut lock_pub(&p)))
                .await
                .map_err(failed)?
                .map_err(ContextError::Failed)
        }
    }

    fn params(&self) -> tss::TssParams {
        lock_pub(&self.personalizer).params().clone()
    }

    fn send(&self, e: EngineEvent) {
        let _ = self.events.send(e);
    }
}

impl RestoreContext for EngineContext {
    async fn root_ticket(&self) -> Result<Vec<u8>, ContextError> {
        self.with_personalizer(|p| {
            p.main_ticket()
                .map(<[u8]>::to_vec)
                .map_err(|e| e.to_string())
        })
        .await
    }

    async fn recovery_os_root_ticket(&self) -> Result<Vec<u8>, ContextError> {
        self.with_personalizer(|p| {
            p.recovery_os_root_ticket()
                .map(<[u8]>::to_vec)
                .map_err(|e| e.to_string())
        })
        .await
    }

    async fn local_policy(&self, args: LocalPolicyArgs) -> Result<Vec<u8>, ContextError> {
        let request = tss::recovery_os_local_policy_request(
            &self.local_policy_identity,
            &self.params(),
            &RecoveryOsLocalPolicyArgs {
                next_stage_im4m_hash: args.next_stage_im4m_hash,
                recovery_os_policy_nonce_hash: args.recovery_os_policy_nonce_hash,
                volume_uuid: volume_uuid_text(&args.volume_uuid),
            },
            &RequestUuid::random(),
        )
        .map_err(failed)?;
        let response = self.tss.send(&request).await.map_err(failed)?;
        let ticket = response.ap_img4_ticket().map_err(failed)?;
        img4::stitch(LOCAL_POLICY, &img4::LPOL_IM4P, ticket, None).map_err(failed)
    }

    async fn build_identity(
        &self,
        is_recovery_os: bool,
        _variant: Option<String>,
    ) -> Result<Dictionary, ContextError> {
        Ok(match (is_recovery_os, &self.recovery_identity) {
            (true, Some(id)) => id.clone(),
            _ => self.identity.clone(),
        })
    }

    async fn personalized(
        &self,
        component: String,
        _is_recovery_os: bool,
    ) -> Result<Vec<u8>, ContextError> {
        self.with_personalizer(move |p| p.personalize(&component).map_err(|e| e.to_string()))
            .await
    }

    async fn raw_file(&self, path: String) -> Result<Vec<u8>, ContextError> {
        let ipsw = Arc::clone(&self.ipsw);
        off_runtime(move || {
            if ipsw.archive().entry(&path).is_none() {
                return Err(ContextError::NotFound(path));
            }
            ipsw.read_small(&path, MAX_RAW_FILE).map_err(failed)
        })
        .await
        .map_err(failed)?
    }

    async fn list_files(&self, prefix: String) -> Result<Vec<String>, ContextError> {
        let mut v: Vec<String> = self
            .ipsw
            .archive()
            .entries()
            .iter()
            .filter(|e| !e.is_dir() && e.name.starts_with(&prefix))
            .map(|e| e.name.clone())
            .collect();
        v.sort();
        Ok(v)
    }

    async fn os_image(&self) -> Result<ImageSource, ContextError> {
        let path = self
            .identity
            .get("Manifest")
            .and_then(Value::as_dictionary)
            .and_then(|m| m.get("OS"))
            .and_then(Value::as_dictionary)
            .and_then(|c| c.get("Info"))
            .and_then(Value::as_dictionary)
            .and_then(|i| i.get("Path"))
            .and_then(Value::as_string)
            .ok_or_else(|| ContextError::NotFound("the system image (Manifest.OS)".into()))?
            .to_string();
        let ipsw = Arc::clone(&self.ipsw);
        off_runtime(move || -> Result<ImageSource, ContextError> {
            let archive = ipsw.archive();
            let entry = archive
                .entry(&path)
                .ok_or_else(|| ContextError::NotFound(path.clone()))?;
            if entry.method == Method::Stored {
                // Read in place: ASR streams the entry straight out of the IPSW.
                Ok(Arc::new(archive.stored_owned(entry).map_err(failed)?))
            } else {
                let bytes = archive
                    .read_to_vec(entry, MAX_INFLATED_OS)
                    .map_err(failed)?;
                Ok(Arc::new(bytes))
            }
        })
        .await
        .map_err(failed)?
    }

    async fn firmware_updater(&self, arguments: Dictionary) -> Result<Value, ContextError> {
        // The updater requests come from the identity the Mac is being restored with (§4.9).
        let response = self
            .tss
            .firmware_updater(&self.identity, &arguments, |path| async move {
                self.raw_file(path).await.map_err(|e| e.to_string())
            })
            .await
            .map_err(failed)?;
        Ok(Value::Dictionary(response))
    }

    async fn url_request(&self, request: UrlRequest) -> Result<UrlResponse, ContextError> {
        let method = reqwest::Method::from_bytes(request.method.as_bytes()).map_err(failed)?;
        let mut rb = self.http.request(method, &request.url);
        for (k, v) in &request.headers {
            rb = rb.header(k, v);
        }
        if !request.body.is_empty() {
            rb = rb.body(request.body);
        }
        let resp = rb
            .send()
            .await
            .map_err(|e| failed(crate::http::describe_error(&e)))?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = resp
            .bytes()
            .await
            .map_err(|e| failed(crate::http::describe_error(&e)))?
            .to_vec();
        Ok(UrlResponse {
            status,
            headers,
            body,
        })
    }

    fn event(&self, event: RestoreEvent) {
        match event {
            RestoreEvent::Progress {
                operation,
                name,
                percent,
            } => {
                lock_pub(&self.trail).last_operation = Some(operation);
                self.send(EngineEvent::Progress {
                    what: name.to_string(),
                    done: percent.map(u64::from).unwrap_or(0),
                    total: percent.map(|_| 100),
                    rate_bps: None,
                });
            }
            RestoreEvent::Checkpoint { checkpoint, .. } => {
                let name = checkpoint
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("{:#x}", checkpoint.id));
                if let Some(err) = &checkpoint.error {
                    lock_pub(&self.trail)
                        .failed_checkpoints
                        .push(format!("{name}: {err}"));
                } else if checkpoint.result != 0 {
                    lock_pub(&self.trail)
                        .failed_checkpoints
                        .push(format!("{name}: result {}", checkpoint.result));
                }
                lock_pub(&self.checkpoints).push((name.clone(), checkpoint.result));
                self.send(EngineEvent::Checkpoint {
                    name,
                    result: checkpoint.result,
                });
            }
            RestoreEvent::ImageProgress { sent, total } => {
                self.send(EngineEvent::Progress {
                    what: "system image".into(),
                    done: sent,
                    total: Some(total),
                    rate_bps: None,
                });
            }
            RestoreEvent::Crash { backtrace } => {
                self.send(EngineEvent::Message(format!(
                    "restored crashed: {}",
                    backtrace.join(" | ")
                )));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_uuid_from_bytes_and_text() {
        assert_eq!(
            volume_uuid_text(&[0xAB; 16]),
            "ABABABAB-ABAB-ABAB-ABAB-ABABABABABAB"
        );
        assert_eq!(
            volume_uuid_text(b"01234567-89AB-CDEF-0123-456789ABCDEF"),
            "01234567-89AB-CDEF-0123-456789ABCDEF"
        );
    }
}
