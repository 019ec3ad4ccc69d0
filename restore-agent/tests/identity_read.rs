//! `read_identity` against a scripted device: a fake transport answering GET_DESCRIPTOR with
//! descriptor bytes shaped like an Apple ROM's.

use std::collections::HashMap;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use restore_agent::identity::{self, AppleMode, IdentityError};
use restore_agent::usb::descriptor::{emit_language_ids, emit_string, DeviceDescriptor};
use restore_agent::usb::{
    ControlSetup, DeviceInfo, HotplugEvent, TransportError, UsbBus, UsbLocation, UsbTransport,
};

/// Answers GET_DESCRIPTOR from a table; everything else stalls. Records every control request.
struct ScriptedDevice {
    info: DeviceInfo,
    /// (descriptor type, index, wIndex) → reply, or the error to return.
    answers: HashMap<(u8, u8, u16), Result<Vec<u8>, TransportError>>,
    log: Arc<Mutex<Vec<(ControlSetup, u16)>>>,
}

impl ScriptedDevice {
    fn new(product_id: u16, serial_index: u8) -> Self {
        let info = DeviceInfo {
            location: UsbLocation {
                bus: 1,
                ports: vec![1, 4],
            },
            address: 7,
            vendor_id: 0x05ac,
            product_id,
        };
        let device = DeviceDescriptor {
            bcd_usb: 0x0200,
            device_class: 0,
            device_subclass: 0,
            device_protocol: 0,
            max_packet_size0: 64,
            vendor_id: 0x05ac,
            product_id,
            bcd_device: 0,
            manufacturer_index: 2,
            product_index: 3,
            serial_number_index: serial_index,
            num_configurations: 1,
        };
        let mut answers = HashMap::new();
        answers.insert((1, 0, 0), Ok(device.emit().to_vec()));
        answers.insert((3, 0, 0), Ok(emit_language_ids(&[0x0409]).unwrap()));
        answers.insert((3, 2, 0x0409), Ok(emit_string("Apple Inc.").unwrap()));
        Self {
            info,
            answers,
            log: Arc::default(),
        }
    }

    fn string(mut self, index: u8, langid: u16, s: &str) -> Self {
        self.answers
            .insert((3, index, langid), Ok(emit_string(s).unwrap()));
        self
    }

    fn answer(
        mut self,
        kind: u8,
        index: u8,
        langid: u16,
        a: Result<Vec<u8>, TransportError>,
    ) -> Self {
        self.answers.insert((kind, index, langid), a);
        self
    }
}

impl UsbTransport for ScriptedDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn control_in(
        &mut self,
        setup: ControlSetup,
        length: u16,
        _timeout: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        self.log.lock().unwrap().push((setup, length));
        if setup.request_type != 0x80 || setup.request != 6 {
            return Err(TransportError::Stall);
        }
        let key = ((setup.value >> 8) as u8, setup.value as u8, setup.index);
        match self.answers.get(&key) {
            Some(Ok(bytes)) => Ok(bytes[..bytes.len().min(usize::from(length))].to_vec()),
            Some(Err(e)) => Err(e.clone()),
            None => Err(TransportError::Stall),
        }
    }

    fn control_out(
        &mut self,
        _: ControlSetup,
        _: &[u8],
        _: Duration,
    ) -> Result<usize, TransportError> {
        Err(TransportError::Stall)
    }

    fn bulk_out(&mut self, _: u8, _: &[u8], _: Duration) -> Result<usize, TransportError> {
        Err(TransportError::Stall)
    }

    fn bulk_in(&mut self, _: u8, _: usize, _: Duration) -> Result<Vec<u8>, TransportError> {
        Err(TransportError::Stall)
    }

    fn set_configuration(&mut self, _: u8) -> Result<(), TransportError> {
        Ok(())
    }

    fn claim_interface(&mut self, _: u8, _: u8) -> Result<(), TransportError> {
        Ok(())
    }

    fn release_interface(&mut self, _: u8) -> Result<(), TransportError> {
        Ok(())
    }

    fn reset(&mut self) -> Result<(), TransportError> {
        Ok(())
    }
}

const M2_AIR_SERIAL: &str = "SDOM:01 CPID:8112 CPRV:10 CPFM:03 SCEP:01 BDID:28 ECID:001C30603EC0C01E IBFL:3C SRTG:[iBoot-8419.0.0.0.1]";
const NONCES: &str = "NONC:8f2b4c6d8e0a1b3c5d7e9f0a2b4c6d8e0f1a3b5c7d9e0f2a4b6c8d0e1f3a5b7c SNON:1a2b3c4d5e6f708192a3b4c5d6e7f80910a1b2c3";

#[test]
fn reads_a_mac_in_dfu() {
    let mut dev = ScriptedDevice::new(0x1227, 4)
        .string(4, 0x0409, M2_AIR_SERIAL)
        .string(1, 0x0409, NONCES);
    let log = dev.log.clone();
    let id = identity::read_identity(&mut dev).unwrap();

    assert_eq!(id.mode, Some(AppleMode::Dfu));
    assert_eq!(id.serial, M2_AIR_SERIAL);
    assert_eq!(id.cpid, Some(0x8112));
    assert_eq!(id.bdid, Some(0x28));
    assert_eq!(id.ecid, Some(7_934_489_275_711_518));
    assert_eq!(id.ecid, Some(0x001c_3060_3ec0_c01e));
    assert_eq!(id.model.unwrap().product_type, "Mac14,2");
    let nonce = id.ap_nonce.as_ref().unwrap();
    assert_eq!(nonce.len(), 32);
    assert_eq!(&nonce[..3], &[0x8f, 0x2b, 0x4c]);
    assert_eq!(id.sep_nonce.as_ref().unwrap().len(), 20);
    assert_eq!(id.nonce_string.as_deref(), Some(NONCES));

    // Exactly the standard requests, in order, with the spec's lengths.
    let log = log.lock().unwrap().clone();
    assert_eq!(
        log,
        vec![
            (ControlSetup::new(0x80, 6, 0x0100, 0), 18),
            (ControlSetup::new(0x80, 6, 0x0300, 0), 255),
            (ControlSetup::new(0x80, 6, 0x0304, 0x0409), 255),
            (ControlSetup::new(0x80, 6, 0x0301, 0x0409), 255),
        ]
    );
}

#[test]
fn nonces_fall_back_to_the_serial_when_string_1_stalls() {
    let serial = format!("{M2_AIR_SERIAL} NONC:0a0b SNON:0c0d");
    let mut dev = ScriptedDevice::new(0x1281, 4).string(4, 0x0409, &serial);
    let id = identity::read_identity(&mut dev).unwrap();
    assert_eq!(id.mode, Some(AppleMode::Recovery));
    assert_eq!(id.ap_nonce, Some(vec![0x0a, 0x0b]));
    assert_eq!(id.sep_nonce, Some(vec![0x0c, 0x0d]));
    assert_eq!(id.nonce_string, None);
}

#[test]
fn uses_the_first_language_and_falls_back_to_en_us() {
    // Device offering German first.
    let mut dev = ScriptedDevice::new(0x1227, 4)
        .answer(3, 0, 0, Ok(emit_language_ids(&[0x0407, 0x0409]).unwrap()))
        .string(4, 0x0407, M2_AIR_SERIAL);
    let id = identity::read_identity(&mut dev).unwrap();
    assert_eq!(id.cpid, Some(0x8112));

    // String 0 stalls: 0x0409.
    let mut dev = ScriptedDevice::new(0x1227, 4)
        .answer(3, 0, 0, Err(TransportError::Stall))
        .string(4, 0x0409, M2_AIR_SERIAL);
    assert_eq!(identity::read_identity(&mut dev).unwrap().bdid, Some(0x28));

    // String 0 empty: 0x0409.
    let mut dev = ScriptedDevice::new(0x1227, 4)
        .answer(3, 0, 0, Ok(vec![2, 3]))
        .string(4, 0x0409, M2_AIR_SERIAL);
    assert_eq!(identity::read_identity(&mut dev).unwrap().bdid, Some(0x28));
}

#[test]
fn port_dfu_device() {
    let mut dev = ScriptedDevice::new(0xf014, 4)
        .string(
            4,
            0x0409,
            "CPID:2222 CPRV:00 BDID:2A813201 ECID:000C69AA3AF3801C PREV:03",
        )
        .string(1, 0x0409, "NONC:00112233");
    let id = identity::read_identity(&mut dev).unwrap();
    assert_eq!(id.mode, Some(AppleMode::PortDfu));
    assert_eq!((id.cpid, id.bdid), (Some(0x8132), Some(0x2a)));
    assert_eq!(id.raw_cpid, Some(0x2222));
    assert_eq!(id.model.unwrap().board_config, "j773gap");
    assert_eq!(id.ap_nonce, Some(vec![0x00, 0x11, 0x22, 0x33]));
    assert_eq!(id.ap_nonce_for_tss(), Some(vec![0x33, 0x22, 0x11, 0x00]));
    assert_eq!(id.prev, Some(3));
}

#[test]
fn unknown_model_is_not_a_read_error() {
    let mut dev = ScriptedDevice::new(0x1227, 4).string(4, 0x0409, "CPID:8152 BDID:30 ECID:01");
    let id = identity::read_identity(&mut dev).unwrap();
    assert_eq!(id.model, None);
    assert_eq!(
        id.require_model(),
        Err(IdentityError::UnknownModel {
            cpid: 0x8152,
            bdid: 0x30
        })
    );
}

#[test]
fn transport_and_descriptor_failures() {
    // The Mac left the bus while its serial was being read.
    let mut dev =
        ScriptedDevice::new(0x1227, 4).answer(3, 4, 0x0409, Err(TransportError::Disconnected));
    assert_eq!(
        identity::read_identity(&mut dev),
        Err(IdentityError::Transport(TransportError::Disconnected))
    );

    // Gone while reading string 1: also an error (the identity would be stale).
    let mut dev = ScriptedDevice::new(0x1227, 4)
        .string(4, 0x0409, M2_AIR_SERIAL)
        .answer(3, 1, 0x0409, Err(TransportError::Disconnected));
    assert!(matches!(
        identity::read_identity(&mut dev),
        Err(IdentityError::Transport(TransportError::Disconnected))
    ));

    // Device descriptor too short.
    let mut dev = ScriptedDevice::new(0x1227, 4).answer(1, 0, 0, Ok(vec![18, 1, 0, 2]));
    let e = identity::read_identity(&mut dev).unwrap_err();
    assert!(matches!(e, IdentityError::Descriptor(_)), "{e:?}");
    assert!(e.to_string().contains("malformed USB descriptor"), "{e}");

    // Serial string with the wrong descriptor type.
    let mut dev = ScriptedDevice::new(0x1227, 4).answer(3, 4, 0x0409, Ok(vec![4, 2, b'A', 0]));
    assert!(matches!(
        identity::read_identity(&mut dev),
        Err(IdentityError::Descriptor(_))
    ));
}

#[test]
fn no_serial_index_gives_an_unidentified_device() {
    let mut dev = ScriptedDevice::new(0x1227, 0);
    let id = identity::read_identity(&mut dev).unwrap();
    assert_eq!(id.serial, "");
    assert!(matches!(
        id.require_model(),
        Err(IdentityError::Unidentified { .. })
    ));
}

struct OneDeviceBus(Mutex<Option<ScriptedDevice>>);

impl UsbBus for OneDeviceBus {
    fn devices(&self) -> Result<Vec<DeviceInfo>, TransportError> {
        Ok(self
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|d| d.info.clone())
            .collect())
    }

    fn open(&self, _: &DeviceInfo) -> Result<Box<dyn UsbTransport>, TransportError> {
        match self.0.lock().unwrap().take() {
            Some(d) => Ok(Box::new(d)),
            None => Err(TransportError::Disconnected),
        }
    }

    fn watch(&self) -> Result<Receiver<HotplugEvent>, TransportError> {
        Err(TransportError::Unavailable(
            "no hotplug in this test".into(),
        ))
    }
}

#[test]
fn probe_opens_and_reads() {
    let dev = ScriptedDevice::new(0x1227, 4).string(4, 0x0409, M2_AIR_SERIAL);
    let bus = OneDeviceBus(Mutex::new(Some(dev)));
    let info = bus.devices().unwrap().remove(0);
    assert!(identity::is_apple_mode_device(&info));
    let id = identity::probe(&bus, &info).unwrap();
    assert_eq!(id.model.unwrap().board_config, "j413ap");
    // Second open: the device is gone.
    assert_eq!(
        identity::probe(&bus, &info),
        Err(IdentityError::Transport(TransportError::Disconnected))
    );
}
