//! The personalizing image provider against a fake signing server that checks every request
//! it receives (main AP, local policy, recoveryOS root; §4.4, §4.6, §4.7) and an in-memory
//! IPSW; every image it produces is re-parsed as IMG4.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::rc::Rc;

use plist::{Dictionary, Value};
use restore_agent::bootchain::images::{ImageError, ImageProvider};
use restore_agent::img4::{self, der, der::Tag, fourcc, im4m, im4p};
use restore_agent::manifest::{BuildIdentity, BuildManifest, RestoreBehavior};
use restore_agent::personalize::{
    ComponentSource, PersonalizeError, Personalizer, RestorePlan, SourceError, TicketRequest,
    TssTransport, TssTransportError,
};
use restore_agent::tss::TssParams;

const ECID: u64 = 0x001c_2b3a_4d5e_6f70;
const AP_NONCE: [u8; 32] = [0xA1; 32];
const SEP_NONCE: [u8; 20] = [0x5E; 20];
const NEW_AP_NONCE: [u8; 32] = [0xB2; 32];

fn shared() -> PathBuf {
    std::env::var_os("MACRESCUE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared")))
}

fn manifest(board: &str) -> BuildManifest {
    BuildManifest::from_path(&shared().join(format!(
        "fixtures/manifests/macOS_26.2_25C56_PreflightBuildManifests/{board}.BuildManifest.plist"
    )))
    .unwrap()
}

/// An in-memory IPSW: manifest path → bytes.
#[derive(Default, Clone)]
struct MemSource {
    files: HashMap<String, Vec<u8>>,
}

impl ComponentSource for MemSource {
    fn read(&self, path: &str) -> Result<Vec<u8>, SourceError> {
        self.files
            .get(path)
            .cloned()
            .ok_or_else(|| SourceError::Missing {
                path: path.to_string(),
                source_name: self.name(),
            })
    }
    fn contains(&self, path: &str) -> Result<bool, SourceError> {
        Ok(self.files.contains_key(path))
    }
    fn name(&self) -> String {
        "test.ipsw".into()
    }
}

/// The payload of a component file: unique per path so a mix-up shows.
fn payload_for(path: &str) -> Vec<u8> {
    format!("payload of {path}").into_bytes()
}

/// The 4CC the IPSW file itself carries: files shared by a normal and a `Restore*` component
/// carry the normal one's tag (that is why the rewrite exists, §5.2).
fn file_fourcc(identity: &BuildIdentity, path: &str, own: &str) -> [u8; 4] {
    let normal = identity
        .components
        .iter()
        .find(|c| c.path.as_deref() == Some(path) && fourcc::restore_rewrite(&c.name).is_none());
    let c = normal.unwrap_or_else(|| identity.component(own).unwrap());
    fourcc::component_fourcc(&c.name, c.img4_payload_type.as_deref()).unwrap_or(*b"test")
}

fn source_for(identity: &BuildIdentity) -> MemSource {
    let mut s = MemSource::default();
    for c in &identity.components {
        if let Some(path) = &c.path {
            let tag = file_fourcc(identity, path, &c.name);
            s.files
                .insert(path.clone(), im4p::build(tag, "test", &payload_for(path)));
        }
    }
    s
}

/// An unsigned IM4M that `im4m::parse` accepts; `serial` (as BORD) makes each one unique.
fn ticket(ecid: u64, serial: u64) -> Vec<u8> {
    let int = |v| der::element(Tag::INTEGER, &der::encode_uint(v));
    let props = [
        der::property(*b"ECID", &int(ecid)),
        der::property(*b"BORD", &int(serial)),
    ]
    .concat();
    let manp = der::property(*b"MANP", &der::element(Tag::SET, &props));
    let manb = der::property(*b"MANB", &der::element(Tag::SET, &manp));
    der::constructed(
        Tag::SEQUENCE,
        &[
            &der::element(Tag::IA5_STRING, b"IM4M"),
            &int(0),
            &der::element(Tag::SET, &manb),
        ],
    )
}

fn success(tickets: Dictionary) -> Vec<u8> {
    let mut xml = Vec::new();
    plist::to_writer_xml(&mut xml, &Value::Dictionary(tickets)).unwrap();
    let mut body = b"STATUS=0&MESSAGE=SUCCESS&REQUEST_STRING=".to_vec();
    body.extend_from_slice(&xml);
    body
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Main,
    LocalPolicy,
    Root,
}

/// Which request this is, from its shape alone (§4.4: components incl. iBSS; §4.6: the local
/// policy tags; §4.7: components but never iBSS/iBEC).
fn classify(d: &Dictionary) -> Kind {
    if d.contains_key("Ap,LocalPolicy") {
        Kind::LocalPolicy
    } else if d.contains_key("iBSS") {
        Kind::Main
    } else {
        Kind::Root
    }
}

#[derive(Default)]
struct TssState {
    requests: Vec<(Kind, Dictionary)>,
    /// Tickets handed out, in order, with their kind.
    issued: Vec<(Kind, Vec<u8>)>,
    /// Answers to give instead of a ticket (front first).
    scripted: VecDeque<Result<Vec<u8>, TssTransportError>>,
    /// Add `RestoreSEP-TBM` to main answers.
    tbm: bool,
    /// Main ticket bytes to hand out instead of a generated one.
    main_ticket: Option<Vec<u8>>,
}

#[derive(Clone, Default)]
struct FakeTss(Rc<RefCell<TssState>>);

impl TssTransport for FakeTss {
    fn request(&mut self, request_xml: &[u8]) -> Result<Vec<u8>, TssTransportError> {
        let d: Dictionary = plist::from_bytes(request_xml).expect("request is an XML plist");
        let kind = classify(&d);
        let mut st = self.0.borrow_mut();
        st.requests.push((kind, d));
        if let Some(answer) = st.scripted.pop_front() {
            return answer;
        }
        let serial = st.issued.len() as u64 + 1;
        let t = match (kind, &st.main_ticket) {
            (Kind::Main, Some(t)) => t.clone(),
            _ => ticket(ECID, serial),
        };
        st.issued.push((kind, t.clone()));
        let mut tickets = Dictionary::new();
        tickets.insert("ApImg4Ticket".into(), Value::Data(t));
        if kind == Kind::Main && st.tbm {
            let mut tbm = Dictionary::new();
            tbm.insert("ucon".into(), Value::Data(vec![0xC0; 4]));
            tbm.insert("ucer".into(), Value::Data(vec![0xCE; 5]));
            tickets.insert("RestoreSEP-TBM".into(), Value::Dictionary(tbm));
        }
        Ok(success(tickets))
    }
}

impl FakeTss {
    fn kinds(&self) -> Vec<Kind> {
        self.0.borrow().requests.iter().map(|(k, _)| *k).collect()
    }
    fn request(&self, i: usize) -> Dictionary {
        self.0.borrow().requests[i].1.clone()
    }
    fn issued(&self, i: usize) -> Vec<u8> {
        self.0.borrow().issued[i].1.clone()
    }
}

fn params() -> TssParams {
    TssParams::new(ECID, Some(AP_NONCE.to_vec()), Some(SEP_NONCE.to_vec()))
}

struct Setup {
    manifest: BuildManifest,
    tss: FakeTss,
}

impl Setup {
    fn new() -> Self {
        Setup {
            manifest: manifest("J274AP"),
            tss: FakeTss::default(),
        }
    }
    fn identity(&self) -> &BuildIdentity {
        self.manifest
            .select_boot_identity("j274ap", RestoreBehavior::Update)
            .unwrap()
    }
    fn provider(&self) -> Personalizer<MemSource, FakeTss> {
        let id = self.identity();
        Personalizer::new(source_for(id), id, self.tss.clone(), params())
    }
}

fn data<'a>(d: &'a Dictionary, key: &str) -> &'a [u8] {
    d.get(key)
        .and_then(Value::as_data)
        .unwrap_or_else(|| panic!("{key} missing or not data"))
}

/// Split a stitched image and check it against what went in.
fn check_image(image: &[u8], component: &str, file: &[u8], ticket: &[u8]) -> img4::Img4Parts {
    let parts = img4::parse_img4(image).unwrap_or_else(|e| panic!("{component}: {e}"));
    assert_eq!(
        &image[parts.im4m.clone().unwrap()],
        ticket,
        "{component} ticket"
    );
    let p = im4p::parse(&image[parts.im4p.clone()]).unwrap();
    let original = im4p::parse(file).unwrap();
    assert_eq!(
        &image[parts.im4p.start..][p.payload.clone()],
        &file[original.payload.clone()],
        "{component} payload"
    );
    let want = fourcc::restore_rewrite(component).unwrap_or(original.fourcc);
    assert_eq!(p.fourcc, want, "{component} 4CC");
    parts
}

#[test]
fn main_request_and_every_boot_image() {
    let s = Setup::new();
    let id = s.identity();
    let src = source_for(id);
    let mut p = s.provider();
    let plan = RestorePlan::new(&s.manifest, "j274ap", RestoreBehavior::Update).unwrap();
    for c in plan.boot_components() {
        if c.component == "Ap,LocalPolicy" {
            continue;
        }
        let image = p.personalized(&c.component).unwrap();
        let path = c.path.as_deref().unwrap();
        let parts = check_image(&image, &c.component, &src.files[path], &s.tss.issued(0));
        assert_eq!(parts.im4r, None, "{}: no TBM, no IM4R", c.component);
        // The plan's 4CC is what the image carries for every rewritten component.
        if fourcc::restore_rewrite(&c.component).is_some() {
            let got = im4p::parse(&image[parts.im4p]).unwrap().fourcc;
            assert_eq!(c.fourcc, Some(got), "{}", c.component);
        }
    }
    // One request for everything.
    assert_eq!(s.tss.kinds(), vec![Kind::Main]);
    let req = s.tss.request(0);
    assert_eq!(
        req.get("ApECID").and_then(Value::as_unsigned_integer),
        Some(ECID)
    );
    assert_eq!(data(&req, "ApNonce"), AP_NONCE);
    assert_eq!(data(&req, "SepNonce"), SEP_NONCE);
    assert_eq!(
        req.get("@ApImg4Ticket").and_then(Value::as_boolean),
        Some(true)
    );
    assert_eq!(
        req.get("ApProductionMode").and_then(Value::as_boolean),
        Some(true)
    );
    assert_eq!(
        data(&req, "UniqueBuildID"),
        id.raw
            .get("UniqueBuildID")
            .and_then(Value::as_data)
            .unwrap()
    );
    for c in [
        "iBSS",
        "iBEC",
        "RestoreRamDisk",
        "RestoreKernelCache",
        "RestoreLogo",
    ] {
        assert!(
            req.get(c).and_then(Value::as_dictionary).is_some(),
            "main request lacks {c}"
        );
    }
    assert!(!req.contains_key("Ap,LocalPolicy"));
}

#[test]
fn local_policy_is_bound_to_the_main_ticket() {
    let s = Setup::new();
    let mut p = s.provider();
    let lpol = p.personalized("Ap,LocalPolicy").unwrap();
    // The local policy needs the main ticket's hash, so the main ticket comes first.
    assert_eq!(s.tss.kinds(), vec![Kind::Main, Kind::LocalPolicy]);
    let main = s.tss.issued(0);
    let lp_ticket = s.tss.issued(1);
    let req = s.tss.request(1);
    assert_eq!(data(&req, "Ap,NextStageIM4MHash"), img4::sha384(&main));
    assert_eq!(
        req.get("Ap,LocalBoot").and_then(Value::as_boolean),
        Some(false)
    );
    let entry = req
        .get("Ap,LocalPolicy")
        .and_then(Value::as_dictionary)
        .unwrap();
    assert_eq!(data(entry, "Digest"), img4::lpol_digest());
    assert_eq!(entry.get("Trusted").and_then(Value::as_boolean), Some(true));
    assert_eq!(data(&req, "ApNonce"), AP_NONCE);
    assert_eq!(
        req.get("ApECID").and_then(Value::as_unsigned_integer),
        Some(ECID)
    );
    assert!(!req.contains_key("iBSS"), "no manifest components in §4.6");

    let parts = check_image(&lpol, "Ap,LocalPolicy", &img4::LPOL_IM4P, &lp_ticket);
    assert_eq!(&lpol[parts.im4p], img4::LPOL_IM4P);
    // Both tickets are cached: more images need no more requests.
    p.personalized("iBSS").unwrap();
    p.personalized("Ap,LocalPolicy").unwrap();
    assert_eq!(s.tss.kinds().len(), 2);
}

#[test]
fn nonce_change_refetches_main_and_local_policy() {
    let s = Setup::new();
    let mut p = s.provider();
    let ibss = p.personalized("iBSS").unwrap();
    p.personalized("Ap,LocalPolicy").unwrap();
    // Same nonces again: nothing to do.
    p.nonces_changed(&AP_NONCE, Some(&SEP_NONCE)).unwrap();
    assert_eq!(s.tss.kinds().len(), 2);

    p.nonces_changed(&NEW_AP_NONCE, None).unwrap();
    assert_eq!(
        s.tss.kinds(),
        vec![Kind::Main, Kind::LocalPolicy, Kind::Main, Kind::LocalPolicy]
    );
    let new_main_req = s.tss.request(2);
    assert_eq!(data(&new_main_req, "ApNonce"), NEW_AP_NONCE);
    // The SepNonce was not re-reported: the known one stays.
    assert_eq!(data(&new_main_req, "SepNonce"), SEP_NONCE);
    let new_main = s.tss.issued(2);
    assert_ne!(new_main, s.tss.issued(0));
    let lp_req = s.tss.request(3);
    assert_eq!(
        data(&lp_req, "Ap,NextStageIM4MHash"),
        img4::sha384(&new_main)
    );
    assert_eq!(data(&lp_req, "ApNonce"), NEW_AP_NONCE);

    // Images from now on carry the new tickets, without further requests.
    let ibec = p.personalized("iBEC").unwrap();
    let parts = img4::parse_img4(&ibec).unwrap();
    assert_eq!(&ibec[parts.im4m.unwrap()], new_main);
    let lpol = p.personalized("Ap,LocalPolicy").unwrap();
    let parts = img4::parse_img4(&lpol).unwrap();
    assert_eq!(&lpol[parts.im4m.unwrap()], s.tss.issued(3));
    assert_ne!(ibss, p.personalized("iBSS").unwrap());
    assert_eq!(s.tss.kinds().len(), 4);
}

#[test]
fn nonce_change_before_any_ticket_stays_lazy() {
    let s = Setup::new();
    let mut p = s.provider();
    p.nonces_changed(&NEW_AP_NONCE, Some(&SEP_NONCE)).unwrap();
    assert!(s.tss.kinds().is_empty());
    p.personalized("iBSS").unwrap();
    assert_eq!(data(&s.tss.request(0), "ApNonce"), NEW_AP_NONCE);
}

#[test]
fn recovery_os_root_ticket_request() {
    let s = Setup::new();
    let mut p = s.provider();
    let root = p.recovery_os_root_ticket().unwrap().to_vec();
    assert_eq!(s.tss.kinds(), vec![Kind::Root]);
    assert_eq!(root, s.tss.issued(0));
    let req = s.tss.request(0);
    assert_eq!(data(&req, "ApNonce"), AP_NONCE);
    assert_eq!(
        req.get("@ApImg4Ticket").and_then(Value::as_boolean),
        Some(true)
    );
    assert_eq!(
        req.get("ApECID").and_then(Value::as_unsigned_integer),
        Some(ECID)
    );
    // §4.7: the boot-chain and restore images are left out, the rest of the OS is in.
    for skipped in [
        "iBSS",
        "iBEC",
        "RestoreLogo",
        "RestoreRamDisk",
        "RestoreKernelCache",
        "LLB",
    ] {
        assert!(!req.contains_key(skipped), "root request has {skipped}");
    }
    assert!(req.contains_key("KernelCache"));
    assert!(!req.contains_key("Ap,LocalPolicy"));
    // Cached.
    p.recovery_os_root_ticket().unwrap();
    assert_eq!(s.tss.kinds().len(), 1);
    // Bound to the nonce: dropped on a change and fetched again on demand.
    p.personalized("iBSS").unwrap();
    p.nonces_changed(&NEW_AP_NONCE, None).unwrap();
    let before = s.tss.kinds().len();
    p.recovery_os_root_ticket().unwrap();
    assert_eq!(s.tss.kinds().len(), before + 1);
    assert_eq!(*s.tss.kinds().last().unwrap(), Kind::Root);
    assert_eq!(data(&s.tss.request(before), "ApNonce"), NEW_AP_NONCE);
}

#[test]
fn tbm_in_the_response_becomes_an_im4r() {
    let s = Setup::new();
    s.tss.0.borrow_mut().tbm = true;
    let mut p = s.provider();
    let sep = p.personalized("RestoreSEP").unwrap();
    let parts = img4::parse_img4(&sep).unwrap();
    let im4r = &sep[parts.im4r.expect("RestoreSEP gets an IM4R")];
    let want = img4::im4r::build(
        "RestoreSEP",
        &img4::Im4rInputs {
            tbm: Some(img4::TbmData {
                ucon: vec![0xC0; 4],
                ucer: vec![0xCE; 5],
            }),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(im4r, want);
    // Only the component the TBM names.
    let ibss = p.personalized("iBSS").unwrap();
    assert_eq!(img4::parse_img4(&ibss).unwrap().im4r, None);
}

#[test]
fn real_apple_ticket_is_stitched_verbatim() {
    let real = std::fs::read(shared().join("fixtures/tss/PyIMG4-IM4M.der")).unwrap();
    let s = Setup::new();
    s.tss.0.borrow_mut().main_ticket = Some(real.clone());
    let mut p = s.provider();
    let image = p.personalized("RestoreKernelCache").unwrap();
    let parts = img4::parse_img4(&image).unwrap();
    assert_eq!(&image[parts.im4m.clone().unwrap()], real);
    let m = im4m::parse(&image[parts.im4m.unwrap()]).unwrap();
    assert!(m.signed);
    assert_eq!(im4p::parse(&image[parts.im4p]).unwrap().fourcc, *b"rkrn");
    // The local policy request hashes exactly those bytes.
    p.personalized("Ap,LocalPolicy").unwrap();
    assert_eq!(
        data(&s.tss.request(1), "Ap,NextStageIM4MHash"),
        img4::sha384(&real)
    );
}

#[test]
fn missing_component_is_named_before_any_request() {
    let s = Setup::new();
    let id = s.identity();
    let mut src = source_for(id);
    let path = id.component("RestoreDCP").unwrap().path.clone().unwrap();
    src.files.remove(&path);
    let mut p = Personalizer::new(src, id, s.tss.clone(), params());

    let e = p.check_available("RestoreDCP").unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("RestoreDCP") && text.contains(&path),
        "{text}"
    );
    assert!(
        text.contains("test.ipsw") && text.contains("download it again"),
        "{text}"
    );
    assert!(p.check_available("iBSS").is_ok());
    assert!(p.check_available("Ap,LocalPolicy").is_ok(), "built in");
    let e = p.check_available("NoSuchThing").unwrap_err();
    assert!(e.to_string().contains("has no NoSuchThing"), "{e}");

    let plan = RestorePlan::new(&s.manifest, "j274ap", RestoreBehavior::Update).unwrap();
    let problems = p.check_all(plan.boot_components().iter().map(|c| c.component.as_str()));
    // Every component made from that file is named (RestoreDCP and Ap,RestoreDCP2 share it).
    let mut named: Vec<String> = problems
        .iter()
        .map(|e| match e {
            PersonalizeError::Source {
                component,
                source: SourceError::Missing { path: p2, .. },
            } if *p2 == path => component.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    named.sort();
    assert_eq!(named, ["Ap,RestoreDCP2", "RestoreDCP"]);

    let e = p.personalized("RestoreDCP").unwrap_err();
    assert!(
        matches!(e, ImageError::Personalization { ref component, .. } if component == "RestoreDCP")
    );
    assert!(e.to_string().contains(&path), "{e}");
    assert!(
        s.tss.kinds().is_empty(),
        "no TSS request for an image that cannot be made"
    );
}

#[test]
fn not_signed_tells_the_technician_to_pick_a_signed_build() {
    for status in ["94", "69"] {
        let s = Setup::new();
        s.tss.0.borrow_mut().scripted.push_back(Ok(format!(
            "STATUS={status}&MESSAGE=This device isn't eligible for the requested build."
        )
        .into_bytes()));
        let mut p = s.provider();
        let e = p.personalize("iBSS").unwrap_err();
        assert!(
            matches!(e, PersonalizeError::NotSigned { ref build, .. } if build == "25C56"),
            "{e:?}"
        );
        // A refusal is not cached: asking again sends a new request (here answered).
        p.personalized("iBSS").unwrap();
        assert_eq!(s.tss.kinds(), vec![Kind::Main, Kind::Main]);
    }
}

#[test]
fn tss_failures_are_reported_per_ticket() {
    // Not signed, through the ImageProvider face.
    let s = Setup::new();
    s.tss.0.borrow_mut().scripted.push_back(Ok(
        b"STATUS=94&MESSAGE=This device isn't eligible for the requested build.".to_vec(),
    ));
    let mut p = s.provider();
    let e = p.personalized("iBSS").unwrap_err().to_string();
    assert!(e.contains("no longer signed for this Mac"), "{e}");
    assert!(e.contains("pick the latest signed build"), "{e}");
    assert!(e.contains("25C56") && e.contains("94"), "{e}");

    // Network failure on the local-policy request.
    let s = Setup::new();
    {
        let mut st = s.tss.0.borrow_mut();
        st.scripted.push_back(Ok(success({
            let mut d = Dictionary::new();
            d.insert("ApImg4Ticket".into(), Value::Data(ticket(ECID, 7)));
            d
        })));
        st.scripted.push_back(Err(TssTransportError::Unreachable(
            "connection refused".into(),
        )));
    }
    let mut p = s.provider();
    let e = p.personalize("Ap,LocalPolicy").unwrap_err();
    assert!(
        matches!(
            e,
            PersonalizeError::Transport {
                which: TicketRequest::LocalPolicy,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("local-policy ticket"), "{e}");
    assert!(e.to_string().contains("connection refused"), "{e}");

    // A reply without a ticket, and one whose ticket is not an IM4M.
    let s = Setup::new();
    s.tss
        .0
        .borrow_mut()
        .scripted
        .push_back(Ok(success(Dictionary::new())));
    let e = s.provider().personalize("iBSS").unwrap_err();
    assert!(e.to_string().contains("ApImg4Ticket"), "{e}");
    let s = Setup::new();
    s.tss.0.borrow_mut().scripted.push_back(Ok(success({
        let mut d = Dictionary::new();
        d.insert("ApImg4Ticket".into(), Value::Data(b"not a ticket".to_vec()));
        d
    })));
    let e = s.provider().personalize("iBSS").unwrap_err();
    assert!(
        matches!(
            e,
            PersonalizeError::BadTicket {
                which: TicketRequest::Main,
                ..
            }
        ),
        "{e:?}"
    );

    // An HTML error page (no STATUS): the transport's retries are exhausted.
    let s = Setup::new();
    s.tss
        .0
        .borrow_mut()
        .scripted
        .push_back(Ok(b"<html>502 Bad Gateway</html>".to_vec()));
    let e = s.provider().personalize("iBSS").unwrap_err();
    assert!(e.to_string().contains("main AP ticket"), "{e}");

    // A nonce refresh that fails is reported through the ImageProvider face.
    let s = Setup::new();
    let mut p = s.provider();
    p.personalized("iBSS").unwrap();
    s.tss.0.borrow_mut().scripted.push_back(Ok(
        b"STATUS=94&MESSAGE=This device isn't eligible for the requested build.".to_vec(),
    ));
    let e = p.nonces_changed(&NEW_AP_NONCE, None).unwrap_err();
    assert!(
        e.to_string().contains("pick the latest signed build"),
        "{e}"
    );
}

#[test]
fn damaged_firmware_file_is_named() {
    let s = Setup::new();
    let id = s.identity();
    let mut src = source_for(id);
    let path = id.component("iBEC").unwrap().path.clone().unwrap();
    src.files.insert(path.clone(), b"garbage".to_vec());
    let mut p = Personalizer::new(src, id, s.tss.clone(), params());
    let e = p.personalize("iBEC").unwrap_err();
    assert!(matches!(e, PersonalizeError::Img4 { ref component, .. } if component == "iBEC"));
    let text = e.to_string();
    assert!(
        text.contains(&path) && text.contains("download the IPSW again"),
        "{text}"
    );
}

/// `Ap,RestoreANE1` shares its file with `Ap,ANE1` but is signed as `ran1` (its
/// Img4PayloadType), although idevicerestore's rewrite list lacks it.
#[test]
fn restore_payloads_get_their_manifest_type_even_outside_the_rewrite_list() {
    let m = manifest("J180dAP");
    let id = m
        .select_boot_identity("j180dap", RestoreBehavior::Update)
        .unwrap();
    let shared_path = id
        .component("Ap,RestoreANE1")
        .unwrap()
        .path
        .clone()
        .unwrap();
    assert_eq!(
        id.component("Ap,ANE1").unwrap().path.as_deref(),
        Some(&*shared_path)
    );
    let mut src = source_for(id);
    // The file carries the normal component's tag, as in the IPSW.
    src.files.insert(
        shared_path.clone(),
        im4p::build(*b"ane1", "test", &payload_for(&shared_path)),
    );
    let tss = FakeTss::default();
    let mut p = Personalizer::new(src, id, tss, params());
    let tag = |image: &[u8]| {
        let parts = img4::parse_img4(image).unwrap();
        im4p::parse(&image[parts.im4p]).unwrap().fourcc
    };
    assert_eq!(tag(&p.personalize("Ap,RestoreANE1").unwrap()), *b"ran1");
    assert_eq!(tag(&p.personalize("Ap,ANE1").unwrap()), *b"ane1");
    // And the plan shows the same tag.
    let plan = RestorePlan::new(&m, "j180dap", RestoreBehavior::Update).unwrap();
    let planned = plan
        .stage2
        .iter()
        .find(|c| c.component == "Ap,RestoreANE1")
        .unwrap();
    assert_eq!(planned.fourcc, Some(*b"ran1"));
}
