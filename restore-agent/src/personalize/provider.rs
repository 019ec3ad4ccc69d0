//! The personalizing [`ImageProvider`]: IM4P payloads from a [`ComponentSource`], tickets from
//! Apple's signing server through a [`TssTransport`], stitched into IMG4 (§4.4, §4.6, §4.7,
//! §5.3–§5.5).
//!
//! Tickets are fetched lazily, once each, on first need:
//! * the main `ApImg4Ticket` (§4.4) personalizes every component except `Ap,LocalPolicy`;
//! * the local-policy ticket (§4.6) personalizes the built-in lpol IM4P; its request carries
//!   `Ap,NextStageIM4MHash` = SHA-384 of the main ticket, so it is always fetched after it;
//! * the recoveryOS root ticket (§4.7) is only handed out for restore mode.
//!
//! # Nonce changes
//!
//! When the Mac re-enumerates with a new ApNonce (after iBSS), the main ticket no longer
//! matches the Mac, and the local-policy ticket binds the *old* main ticket through
//! `Ap,NextStageIM4MHash`. idevicerestore re-requests only the main ticket (§4.6 caveat, §12
//! item 11), leaving a local-policy ticket that names a ticket the Mac never sees. We re-fetch
//! **both** (main first, then the local policy over the new main ticket's hash) so the pair
//! stays consistent; the root ticket, also bound to the nonce, is dropped and re-fetched when
//! restore mode asks for it.

use std::fmt;

use crate::bootchain::images::{ImageError, ImageProvider};
use crate::bootchain::plan::LOCAL_POLICY;
use crate::img4::{self, im4m, im4r, Im4rInputs, Img4Error};
use crate::manifest::BuildIdentity;
use crate::tss::{self, RequestUuid, TssError, TssParams, TssResponse};

use super::source::{ComponentSource, SourceError};

/// Why a TSS request did not produce an answer from the server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TssTransportError {
    #[error("cannot reach Apple's signing server ({0}); check the station's network connection, proxy and CA settings, then try again")]
    Unreachable(String),
    #[error("Apple's signing server answered HTTP {status}; wait a few minutes and try again")]
    Http { status: u16 },
    #[error("the TSS request was cancelled")]
    Cancelled,
}

/// Posts one TSS request and returns the raw response body (`STATUS=…&MESSAGE=…`).
///
/// Blocking on purpose: the boot-chain driver runs on its own thread and calls the provider
/// synchronously; an async HTTP client implements this by blocking on its runtime. Retries on
/// network failure (§4.1) belong to the implementation; an answer with a STATUS is final.
pub trait TssTransport {
    fn request(&mut self, request_xml: &[u8]) -> Result<Vec<u8>, TssTransportError>;
}

impl<T: TssTransport + ?Sized> TssTransport for &mut T {
    fn request(&mut self, request_xml: &[u8]) -> Result<Vec<u8>, TssTransportError> {
        (**self).request(request_xml)
    }
}

impl<T: TssTransport + ?Sized> TssTransport for Box<T> {
    fn request(&mut self, request_xml: &[u8]) -> Result<Vec<u8>, TssTransportError> {
        (**self).request(request_xml)
    }
}

/// The tickets this provider asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TicketRequest {
    Main,
    LocalPolicy,
    RecoveryOsRoot,
}

impl fmt::Display for TicketRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TicketRequest::Main => "main AP ticket",
            TicketRequest::LocalPolicy => "local-policy ticket",
            TicketRequest::RecoveryOsRoot => "recoveryOS root ticket",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PersonalizeError {
    #[error("the build identity \"{variant}\" has no {component}; this IPSW cannot restore this Mac: use the IPSW for this Mac")]
    NotInManifest { component: String, variant: String },
    #[error("{component} has no Info.Path in the BuildManifest; the manifest may be damaged: download the IPSW again")]
    NoPath { component: String },
    #[error("cannot get {component}: {source}")]
    Source {
        component: String,
        #[source]
        source: SourceError,
    },
    #[error("this build ({build}) is no longer signed for this Mac (TSS status {status}: {message}): pick the latest signed build")]
    NotSigned {
        build: String,
        status: i64,
        message: String,
    },
    #[error("the {which} request failed: {source}")]
    Tss {
        which: TicketRequest,
        #[source]
        source: TssError,
    },
    #[error("the {which} request got no answer: {source}")]
    Transport {
        which: TicketRequest,
        #[source]
        source: TssTransportError,
    },
    #[error("Apple's signing server sent a {which} that is not a valid IM4M ({source}); try again, and if this persists report it with the log")]
    BadTicket {
        which: TicketRequest,
        #[source]
        source: Img4Error,
    },
    #[error(
        "cannot personalize {component}: {path} is damaged ({source}); download the IPSW again"
    )]
    Img4 {
        component: String,
        path: String,
        #[source]
        source: Img4Error,
    },
}

#[derive(Debug, Clone)]
struct MainTicket {
    response: TssResponse,
    ticket: Vec<u8>,
}

/// Personalizes boot-chain (and later restore-mode) images for one Mac and one identity.
pub struct Personalizer<S, T> {
    source: S,
    identity: BuildIdentity,
    transport: T,
    params: TssParams,
    main: Option<MainTicket>,
    local_policy: Option<Vec<u8>>,
    root: Option<Vec<u8>>,
}

impl<S, T> fmt::Debug for Personalizer<S, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Personalizer")
            .field("variant", &self.identity.info.variant)
            .field("ecid", &format_args!("{:016X}", self.params.ecid))
            .field("main_ticket", &self.main.is_some())
            .field("local_policy_ticket", &self.local_policy.is_some())
            .field("root_ticket", &self.root.is_some())
            .finish()
    }
}

impl<S: ComponentSource, T: TssTransport> Personalizer<S, T> {
    /// `identity` is the one the boot chain uses (`RestorePlan` / `select_boot_identity`);
    /// `params` carries the Mac's ECID and nonces.
    pub fn new(source: S, identity: &BuildIdentity, transport: T, params: TssParams) -> Self {
        Self {
            source,
            identity: identity.clone(),
            transport,
            params,
            main: None,
            local_policy: None,
            root: None,
        }
    }

    pub fn params(&self) -> &TssParams {
        &self.params
    }

    pub fn identity(&self) -> &BuildIdentity {
        &self.identity
    }

    pub fn source(&self) -> &S {
        &self.source
    }

    fn build(&self) -> String {
        self.identity
            .info
            .build_number
            .clone()
            .unwrap_or_else(|| "unknown build".into())
    }

    fn send(
        &mut self,
        which: TicketRequest,
        request: &plist::Dictionary,
    ) -> Result<TssResponse, PersonalizeError> {
        let xml = tss::to_xml(request).map_err(|source| PersonalizeError::Tss { which, source })?;
        tracing::info!(
            "requesting the {which} for ECID {:016X} ({})",
            self.params.ecid,
            self.identity.info.variant
        );
        let body = self
            .transport
            .request(&xml)
            .map_err(|source| PersonalizeError::Transport { which, source })?;
        tss::parse_response(&body).map_err(|e| match e {
            TssError::NotSigned { status, message } => PersonalizeError::NotSigned {
                build: self.build(),
                status,
                message,
            },
            source => PersonalizeError::Tss { which, source },
        })
    }

    fn ticket_of(
        which: TicketRequest,
        response: &TssResponse,
    ) -> Result<Vec<u8>, PersonalizeError> {
        let ticket = response
            .ap_img4_ticket()
            .map_err(|source| PersonalizeError::Tss { which, source })?;
        im4m::parse(ticket).map_err(|source| PersonalizeError::BadTicket { which, source })?;
        Ok(ticket.to_vec())
    }

    fn ensure_main(&mut self) -> Result<&MainTicket, PersonalizeError> {
        let main = match self.main.take() {
            Some(m) => m,
            None => {
                let which = TicketRequest::Main;
                let req =
                    tss::main_ap_request(&self.identity.raw, &self.params, &RequestUuid::random())
                        .map_err(|source| PersonalizeError::Tss { which, source })?;
                let response = self.send(which, &req)?;
                let ticket = Self::ticket_of(which, &response)?;
                MainTicket { response, ticket }
            }
        };
        Ok(self.main.insert(main))
    }

    /// The main `ApImg4Ticket` (§4.4), fetched on first use.
    pub fn main_ticket(&mut self) -> Result<&[u8], PersonalizeError> {
        Ok(&self.ensure_main()?.ticket)
    }

    /// The DFU-stage local-policy ticket (§4.6), bound to the current main ticket.
    pub fn local_policy_ticket(&mut self) -> Result<&[u8], PersonalizeError> {
        let ticket = match self.local_policy.take() {
            Some(t) => t,
            None => {
                let which = TicketRequest::LocalPolicy;
                let main = self.ensure_main()?.ticket.clone();
                let req = tss::local_policy_request(
                    &self.identity.raw,
                    &self.params,
                    &main,
                    &RequestUuid::random(),
                )
                .map_err(|source| PersonalizeError::Tss { which, source })?;
                let response = self.send(which, &req)?;
                Self::ticket_of(which, &response)?
            }
        };
        Ok(self.local_policy.insert(ticket))
    }

    /// The recoveryOS root ticket (§4.7), for restore mode's `RecoveryOSRootTicketData`.
    pub fn recovery_os_root_ticket(&mut self) -> Result<&[u8], PersonalizeError> {
        let ticket = match self.root.take() {
            Some(t) => t,
            None => {
                let which = TicketRequest::RecoveryOsRoot;
                let req = tss::recovery_os_root_request(
                    &self.identity.raw,
                    &self.params,
                    &RequestUuid::random(),
                )
                .map_err(|source| PersonalizeError::Tss { which, source })?;
                let response = self.send(which, &req)?;
                Self::ticket_of(which, &response)?
            }
        };
        Ok(self.root.insert(ticket))
    }

    fn path_of(&self, component: &str) -> Result<String, PersonalizeError> {
        let entry =
            self.identity
                .component(component)
                .ok_or_else(|| PersonalizeError::NotInManifest {
                    component: component.to_string(),
                    variant: self.identity.info.variant.clone(),
                })?;
        entry.path.clone().ok_or_else(|| PersonalizeError::NoPath {
            component: component.to_string(),
        })
    }

    /// The personalized IMG4 of `component`.
    pub fn personalize(&mut self, component: &str) -> Result<Vec<u8>, PersonalizeError> {
        if component == LOCAL_POLICY {
            let ticket = self.local_policy_ticket()?.to_vec();
            return img4::stitch(LOCAL_POLICY, &img4::LPOL_IM4P, &ticket, None).map_err(|source| {
                PersonalizeError::Img4 {
                    component: component.to_string(),
                    path: "(built-in lpol IM4P)".into(),
                    source,
                }
            });
        }
        let path = self.path_of(component)?;
        let mut im4p = self
            .source
            .read(&path)
            .map_err(|source| PersonalizeError::Source {
                component: component.to_string(),
                source,
            })?;
        let payload_type = self
            .identity
            .component(component)
            .and_then(|c| c.img4_payload_type.clone());
        retag(component, payload_type.as_deref(), &mut im4p).map_err(|source| {
            PersonalizeError::Img4 {
                component: component.to_string(),
                path: path.clone(),
                source,
            }
        })?;
        let main = self.ensure_main()?;
        let im4r = main.response.tbm(component).and_then(|tbm| {
            im4r::build(
                component,
                &Im4rInputs {
                    tbm: Some(tbm),
                    ..Im4rInputs::default()
                },
            )
        });
        img4::stitch(component, &im4p, &main.ticket, im4r.as_deref()).map_err(|source| {
            PersonalizeError::Img4 {
                component: component.to_string(),
                path,
                source,
            }
        })
    }

    /// New nonces from the Mac: drop every nonce-bound ticket and, when tickets were already
    /// in use, fetch the main and the local-policy ticket again right away (module docs), so a
    /// refusal surfaces here rather than in the middle of a stage. A `sep_nonce` of `None`
    /// (not in the re-enumerated serial string) keeps the SepNonce known so far.
    pub fn refresh(
        &mut self,
        ap_nonce: &[u8],
        sep_nonce: Option<&[u8]>,
    ) -> Result<(), PersonalizeError> {
        let sep = sep_nonce
            .map(<[u8]>::to_vec)
            .or(self.params.sep_nonce.clone());
        if self.params.ap_nonce.as_deref() == Some(ap_nonce) && self.params.sep_nonce == sep {
            tracing::debug!("nonces unchanged; keeping the tickets");
            return Ok(());
        }
        let were_in_use = self.main.is_some();
        self.params.ap_nonce = Some(ap_nonce.to_vec());
        self.params.sep_nonce = sep;
        self.main = None;
        self.local_policy = None;
        self.root = None;
        if were_in_use {
            tracing::info!(
                "ApNonce changed to {}: fetching new main and local-policy tickets",
                hex::encode(ap_nonce)
            );
            self.ensure_main()?;
            self.local_policy_ticket()?;
        }
        Ok(())
    }

    /// Whether `component` can be personalized from the source (no network).
    pub fn check(&self, component: &str) -> Result<(), PersonalizeError> {
        if component == LOCAL_POLICY {
            return Ok(());
        }
        let path = self.path_of(component)?;
        let missing = |source| PersonalizeError::Source {
            component: component.to_string(),
            source,
        };
        if self.source.contains(&path).map_err(missing)? {
            Ok(())
        } else {
            Err(missing(SourceError::Missing {
                path,
                source_name: self.source.name(),
            }))
        }
    }

    /// Every problem [`check`](Self::check) finds over `components`, so a technician sees all
    /// missing files at once.
    pub fn check_all<'a>(
        &self,
        components: impl IntoIterator<Item = &'a str>,
    ) -> Vec<PersonalizeError> {
        components
            .into_iter()
            .filter_map(|c| self.check(c).err())
            .collect()
    }
}

/// Give the IM4P the type tag the ticket will list it under, before stitching.
///
/// idevicerestore rewrites only a fixed list of `Restore*` names (§5.2, applied again by
/// `img4::stitch`). Manifests also name restore payloads outside that list through
/// `Info.Img4PayloadType`: `Ap,RestoreANE1` (`ran1`) shares its file with `Ap,ANE1` (`ane1`)
/// yet has a different `Digest` in every fixture manifest, exactly like the listed pairs
/// (`Ap,CIO`/`Ap,RestoreCIO`), so its digest covers the IM4P with `ran1`. We therefore use
/// the stated payload type whenever the file carries another tag (pymobiledevice3 rewrites
/// every component it has a tag for, with the same effect).
fn retag(component: &str, payload_type: Option<&str>, im4p: &mut [u8]) -> Result<(), Img4Error> {
    let parsed = img4::im4p::parse(im4p)?;
    let want = img4::fourcc::restore_rewrite(component)
        .or_else(|| payload_type.and_then(|t| <[u8; 4]>::try_from(t.as_bytes()).ok()));
    if let Some(tag) = want {
        if tag != parsed.fourcc {
            tracing::debug!(
                "{component}: IM4P type {:?} becomes {:?}",
                String::from_utf8_lossy(&parsed.fourcc),
                String::from_utf8_lossy(&tag)
            );
            // `parse` proved the 4 type bytes lie inside `im4p` at this offset.
            im4p[parsed.fourcc_offset..parsed.fourcc_offset + 4].copy_from_slice(&tag);
        }
    }
    Ok(())
}

fn image_error(component: &str, e: PersonalizeError) -> ImageError {
    ImageError::Personalization {
        component: component.to_string(),
        reason: e.to_string(),
    }
}

impl<S: ComponentSource, T: TssTransport> ImageProvider for Personalizer<S, T> {
    fn personalized(&mut self, component: &str) -> Result<Vec<u8>, ImageError> {
        self.personalize(component)
            .map_err(|e| image_error(component, e))
    }

    fn nonces_changed(
        &mut self,
        ap_nonce: &[u8],
        sep_nonce: Option<&[u8]>,
    ) -> Result<(), ImageError> {
        self.refresh(ap_nonce, sep_nonce)
            .map_err(|e| image_error("the tickets for the new ApNonce", e))
    }

    fn check_available(&self, component: &str) -> Result<(), ImageError> {
        self.check(component).map_err(|e| image_error(component, e))
    }
}
