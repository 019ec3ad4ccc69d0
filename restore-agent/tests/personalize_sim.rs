//! The personalizing provider driving the real boot-chain driver against the simulated Mac,
//! which verifies every image's ticket and digest: IM4Ps come from a directory laid out like
//! an IPSW, tickets from a fake signing server that signs what the IPSW holds, the way the
//! simulator trusts. Also the proof that `plan` shows exactly what the driver sends, for every
//! fixture board.

mod support;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use mac_sim::board::Board;
use mac_sim::device::{SimMac, Timing};
use mac_sim::faults::{Faults, StartMode};
use mac_sim::images::{fourcc_for, LPOL_IM4P};
use mac_sim::img4::{build_im4m, build_im4p, FourCc, TicketSpec};
use plist::{Dictionary, Value};
use restore_agent::bootchain::driver::{wait_for_device, Driver, DriverOptions};
use restore_agent::bootchain::images::{ImageError, ImageProvider};
use restore_agent::identity;
use restore_agent::manifest::{BuildIdentity, BuildManifest, RestoreBehavior};
use restore_agent::personalize::{
    DirSource, Personalizer, RestorePlan, TssTransport, TssTransportError,
};
use restore_agent::tss::TssParams;
use restore_agent::usb::UsbBus;
use sha2::{Digest, Sha384};
use support::{fast_timeouts, manifest_path, SimUsb, TempDir};

const ECID: u64 = 0x0011_2233_4455_6677;

fn manifest_for(board: &str) -> BuildManifest {
    BuildManifest::from_path(&manifest_path(board)).unwrap()
}

fn payload(path: &str) -> Vec<u8> {
    let mut v = format!("firmware at {path} ").into_bytes();
    v.resize(1500 + path.len() * 7, 0x5A);
    v
}

/// The 4CC the simulated Mac expects for `c` (its own reading of the manifest).
fn sim_fourcc(c: &restore_agent::manifest::Component) -> FourCc {
    fourcc_for(&c.name, c.img4_payload_type.as_deref())
}

/// Write every boot-chain file at its manifest path. A file shared by a normal and a Restore*
/// component carries the normal component's tag, as in a real IPSW.
fn write_ipsw_dir(source: &DirSource, id: &BuildIdentity, needed: &[String]) {
    for name in needed {
        let Some(c) = id.component(name) else {
            continue;
        };
        let path = c.path.as_deref().unwrap();
        let owner = id
            .components
            .iter()
            .find(|o| o.path.as_deref() == Some(path) && !o.name.contains("Restore"))
            .unwrap_or(c);
        let file = source.path_for(path).unwrap();
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, build_im4p(sim_fourcc(owner), "sim", &payload(path))).unwrap();
    }
}

#[derive(Default)]
struct SignerLog {
    main: usize,
    local_policy: usize,
    ap_nonces: Vec<Vec<u8>>,
}

/// A signing server that knows the IPSW: for every boot component named in a main request it
/// signs the digest of the IM4P as the Mac will receive it (the simulator's 4CC), with the
/// simulator's ticket format.
struct SimSigner {
    board: Board,
    identity: BuildIdentity,
    log: Rc<RefCell<SignerLog>>,
}

impl SimSigner {
    fn spec(&self, digests: Vec<(FourCc, Vec<u8>)>) -> TicketSpec {
        TicketSpec {
            chip: self.board.cpid,
            board: self.board.bdid,
            ecid: ECID,
            security_domain: self.board.security_domain,
            production: true,
            security: true,
            digests,
        }
    }
}

impl TssTransport for SimSigner {
    fn request(&mut self, request_xml: &[u8]) -> Result<Vec<u8>, TssTransportError> {
        let req: Dictionary = plist::from_bytes(request_xml).unwrap();
        assert_eq!(
            req.get("ApECID").and_then(Value::as_unsigned_integer),
            Some(ECID)
        );
        let nonce = req
            .get("ApNonce")
            .and_then(Value::as_data)
            .unwrap()
            .to_vec();
        let mut log = self.log.borrow_mut();
        log.ap_nonces.push(nonce);
        let ticket = if req.contains_key("Ap,LocalPolicy") {
            log.local_policy += 1;
            build_im4m(&self.spec(vec![(FourCc(*b"lpol"), Sha384::digest(LPOL_IM4P).to_vec())]))
        } else {
            log.main += 1;
            let mut digests = Vec::new();
            for c in &self.identity.components {
                let Some(path) = &c.path else { continue };
                if !req.contains_key(&c.name) {
                    continue;
                }
                let tag = sim_fourcc(c);
                digests.push((
                    tag,
                    Sha384::digest(build_im4p(tag, "sim", &payload(path))).to_vec(),
                ));
            }
            build_im4m(&self.spec(digests))
        };
        let mut d = Dictionary::new();
        d.insert("ApImg4Ticket".into(), Value::Data(ticket));
        let mut xml = Vec::new();
        plist::to_writer_xml(&mut xml, &Value::Dictionary(d)).unwrap();
        let mut body = b"STATUS=0&MESSAGE=SUCCESS&REQUEST_STRING=".to_vec();
        body.extend_from_slice(&xml);
        Ok(body)
    }
}

/// Records the order in which the driver asks for images.
struct Recorder<P> {
    inner: P,
    asked: Vec<String>,
}

impl<P: ImageProvider> ImageProvider for Recorder<P> {
    fn personalized(&mut self, component: &str) -> Result<Vec<u8>, ImageError> {
        self.asked.push(component.to_string());
        self.inner.personalized(component)
    }
    fn nonces_changed(&mut self, ap: &[u8], sep: Option<&[u8]>) -> Result<(), ImageError> {
        self.inner.nonces_changed(ap, sep)
    }
    fn check_available(&self, component: &str) -> Result<(), ImageError> {
        self.inner.check_available(component)
    }
}

struct Outcome {
    asked: Vec<String>,
    plan: RestorePlan,
    log: Rc<RefCell<SignerLog>>,
    result: Result<(), String>,
}

fn run(board_config: &str, faults: Faults) -> Outcome {
    let board = Board::load(board_config).unwrap();
    let manifest = manifest_for(board_config);
    let plan = RestorePlan::new(&manifest, board_config, RestoreBehavior::Update).unwrap();
    let id = plan.identity_in(&manifest).unwrap().clone();
    let needed: Vec<String> = plan
        .boot_components()
        .iter()
        .map(|c| c.component.clone())
        .collect();
    // Laid out like the software-update bundle the fixture manifests come from.
    let dir = TempDir::new(board_config);
    let source = DirSource::within(dir.0.join("AssetData/boot"), dir.0.join("AssetData"));
    write_ipsw_dir(&source, &id, &needed);

    let usb = SimUsb::new();
    usb.plug(Box::new(SimMac::new(
        board.clone(),
        ECID,
        faults.start.unwrap_or(StartMode::Dfu),
        faults,
        Timing::fast(),
    )));
    let device =
        wait_for_device(&usb, None, Duration::from_secs(2), identity::read_identity).unwrap();
    let mac = {
        let mut t = usb.open(&device).unwrap();
        identity::read_identity(t.as_mut()).unwrap()
    };
    let params = TssParams::new(
        mac.ecid.unwrap(),
        mac.ap_nonce.clone(),
        mac.sep_nonce.clone(),
    );
    let log = Rc::new(RefCell::new(SignerLog::default()));
    let signer = SimSigner {
        board,
        identity: id.clone(),
        log: log.clone(),
    };
    let mut images = Recorder {
        inner: Personalizer::new(source, &id, signer, params),
        asked: Vec::new(),
    };
    let options = DriverOptions {
        wait_for_restore: true,
        timeouts: fast_timeouts(),
        ..DriverOptions::default()
    };
    let mut progress = |_: &_| {};
    let result = Driver::new(&usb, &mut images, &mut progress, options)
        .run(&device, &manifest)
        .map(|_| ())
        .map_err(|e| e.to_string());
    Outcome {
        asked: images.asked,
        plan,
        log,
        result,
    }
}

fn plan_order(plan: &RestorePlan) -> Vec<String> {
    plan.dfu
        .iter()
        .chain(&plan.stage1)
        .chain(&plan.stage2)
        .map(|c| c.component.clone())
        .collect()
}

#[test]
fn a_personalized_boot_chain_is_accepted_by_the_simulated_mac() {
    let o = run("j274ap", Faults::default());
    o.result.unwrap();
    assert_eq!(o.asked, plan_order(&o.plan));
    let log = o.log.borrow();
    assert_eq!((log.main, log.local_policy), (1, 1));
}

#[test]
fn a_nonce_change_after_ibss_gets_fresh_tickets_the_mac_accepts() {
    let faults = Faults {
        change_nonce_on_boot: true,
        ..Faults::default()
    };
    let o = run("j274ap", faults);
    o.result.unwrap();
    let log = o.log.borrow();
    // The first main ticket personalizes iBSS; the local policy is fetched when stage 1
    // needs it. New nonces after iBSS and after iBEC: main + local policy again each time.
    assert_eq!((log.main, log.local_policy), (3, 2));
    assert_ne!(log.ap_nonces.first(), log.ap_nonces.last());
}

/// What `plan` prints is, component for component and in order, what the driver asks for.
#[test]
fn plan_equals_what_the_driver_sends_on_every_fixture_board() {
    for board in Board::fixture_boards().unwrap() {
        if board == "vma2macosap" {
            // Apple's macOS VM never sits on a USB cable.
            continue;
        }
        let o = run(&board, Faults::default());
        o.result
            .unwrap_or_else(|e| panic!("{board}: boot chain failed: {e}"));
        assert_eq!(o.asked, plan_order(&o.plan), "{board}");
    }
}
