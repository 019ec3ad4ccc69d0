//! Personalization: what the restore needs from the IPSW and from Apple's signing server, and
//! the [`ImageProvider`](crate::bootchain::ImageProvider) that produces signed IMG4 images for
//! the boot chain (protocol.md §4, §5, §9.5–§9.7, §10).
//!
//! * [`plan`] is pure: a `BuildManifest` + board + behaviour in, the chosen identity and the
//!   ordered components of every stage out. Its stage lists are read off
//!   [`bootchain::plan`](crate::bootchain::plan), so what the plan shows and what the driver
//!   sends cannot drift apart.
//! * [`source`] is where IM4P payloads come from (an IPSW, or a directory for tests).
//! * [`provider`] fetches tickets through a [`provider::TssTransport`] (the HTTP client lives
//!   elsewhere) and stitches IMG4 containers.

pub mod plan;
pub mod provider;
pub mod source;

pub use plan::{PlanItem, PlannedComponent, RestorePlan, RestorePlanError, TicketKind};
pub use provider::{
    PersonalizeError, Personalizer, TicketRequest, TssTransport, TssTransportError,
};
pub use source::{ComponentSource, DirSource, IpswSource, SourceError};
