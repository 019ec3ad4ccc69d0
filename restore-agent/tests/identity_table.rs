//! The CPID+BDID table against its sources: Restore.plist's DeviceMap (read at test time) and
//! every row of protocol.md §1.5 (hard-coded here), the latter through the serial-string path.

use std::path::PathBuf;

use restore_agent::identity::{devices, AppleMode, DeviceIdentity, IdentityError, ModelKind};

fn shared() -> PathBuf {
    match std::env::var_os("MACRESCUE_SHARED") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared")),
    }
}

#[test]
fn every_device_map_entry_resolves_to_its_board_config() {
    let path = shared().join("fixtures/manifests/macOS_26.2_25C56_SharedSupport/Restore.plist");
    let restore: plist::Dictionary =
        plist::from_file(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let map = restore["DeviceMap"]
        .as_array()
        .expect("DeviceMap is an array");
    assert!(map.len() >= 50, "DeviceMap has only {} entries", map.len());
    for entry in map {
        let d = entry.as_dictionary().expect("DeviceMap entry is a dict");
        let int = |k: &str| d[k].as_unsigned_integer().expect(k) as u32;
        let (cpid, bdid) = (int("CPID"), int("BDID"));
        let board = d["BoardConfig"].as_string().expect("BoardConfig");
        let platform = d["Platform"].as_string().expect("Platform");
        let m = devices::lookup(cpid, bdid)
            .unwrap_or_else(|| panic!("{board} ({cpid:#x}/{bdid:#x}) missing from the table"));
        assert!(
            m.board_config.eq_ignore_ascii_case(board),
            "{cpid:#x}/{bdid:#x}: table says {}, DeviceMap says {board}",
            m.board_config
        );
        let expected_kind = match platform {
            "x86_64" => ModelKind::IntelT2Mac,
            "vmapple2" => ModelKind::VirtualMac,
            _ => ModelKind::AppleSiliconMac,
        };
        assert_eq!(m.kind, expected_kind, "{board}");
        // Every Mac product type in the table is one this macOS lists as supported.
        if m.kind != ModelKind::IntelT2Mac {
            let supported = restore["SupportedProductTypes"].as_array().unwrap();
            assert!(
                supported
                    .iter()
                    .any(|p| p.as_string() == Some(m.product_type)),
                "{} not in SupportedProductTypes",
                m.product_type
            );
        }
    }
}

/// protocol.md §1.5, every Mac row: (product type, board config, BDID, CPID, name).
const SPEC_ROWS: &[(&str, &str, u32, u32, &str)] = &[
    (
        "ADP3,2",
        "j273aap",
        0x42,
        0x8027,
        "Developer Transition Kit (2020)",
    ),
    ("Macmini9,1", "j274ap", 0x22, 0x8103, "Mac mini (M1, 2020)"),
    (
        "MacBookPro17,1",
        "j293ap",
        0x24,
        0x8103,
        "MacBook Pro (M1, 13-inch, 2020)",
    ),
    (
        "MacBookAir10,1",
        "j313ap",
        0x26,
        0x8103,
        "MacBook Air (M1, 2020)",
    ),
    (
        "iMac21,1",
        "j456ap",
        0x28,
        0x8103,
        "iMac 24-inch (M1, Two Ports, 2021)",
    ),
    (
        "iMac21,2",
        "j457ap",
        0x2A,
        0x8103,
        "iMac 24-inch (M1, Four Ports, 2021)",
    ),
    (
        "MacBookPro18,1",
        "j316sap",
        0x0A,
        0x6000,
        "MacBook Pro (M1 Pro, 16-inch, 2021)",
    ),
    (
        "MacBookPro18,3",
        "j314sap",
        0x08,
        0x6000,
        "MacBook Pro (M1 Pro, 14-inch, 2021)",
    ),
    (
        "MacBookPro18,2",
        "j316cap",
        0x0A,
        0x6001,
        "MacBook Pro (M1 Max, 16-inch, 2021)",
    ),
    (
        "MacBookPro18,4",
        "j314cap",
        0x08,
        0x6001,
        "MacBook Pro (M1 Max, 14-inch, 2021)",
    ),
    (
        "Mac13,1",
        "j375cap",
        0x04,
        0x6001,
        "Mac Studio (M1 Max, 2022)",
    ),
    (
        "Mac13,2",
        "j375dap",
        0x0C,
        0x6002,
        "Mac Studio (M1 Ultra, 2022)",
    ),
    ("Mac14,2", "j413ap", 0x28, 0x8112, "MacBook Air (M2, 2022)"),
    (
        "Mac14,7",
        "j493ap",
        0x2A,
        0x8112,
        "MacBook Pro (M2, 13-inch, 2022)",
    ),
    ("Mac14,3", "j473ap", 0x24, 0x8112, "Mac mini (M2, 2023)"),
    (
        "Mac14,15",
        "j415ap",
        0x2E,
        0x8112,
        "MacBook Air (M2, 15-inch, 2023)",
    ),
    (
        "Mac14,9",
        "j414sap",
        0x04,
        0x6020,
        "MacBook Pro (14-inch, M2 Pro, 2023)",
    ),
    (
        "Mac14,10",
        "j416sap",
        0x06,
        0x6020,
        "MacBook Pro (16-inch, M2 Pro, 2023)",
    ),
    (
        "Mac14,12",
        "j474sap",
        0x02,
        0x6020,
        "Mac mini (M2 Pro, 2023)",
    ),
    (
        "Mac14,5",
        "j414cap",
        0x04,
        0x6021,
        "MacBook Pro (14-inch, M2 Max, 2023)",
    ),
    (
        "Mac14,6",
        "j416cap",
        0x06,
        0x6021,
        "MacBook Pro (16-inch, M2 Max, 2023)",
    ),
    (
        "Mac14,13",
        "j475cap",
        0x0A,
        0x6021,
        "Mac Studio (M2 Max, 2023)",
    ),
    ("Mac14,8", "j180dap", 0x08, 0x6022, "Mac Pro (2023)"),
    (
        "Mac14,14",
        "j475dap",
        0x0A,
        0x6022,
        "Mac Studio (M2 Ultra, 2023)",
    ),
    (
        "Mac15,3",
        "j504ap",
        0x22,
        0x8122,
        "MacBook Pro (14-inch, M3, Nov 2023)",
    ),
    (
        "Mac15,4",
        "j433ap",
        0x28,
        0x8122,
        "iMac 24-inch (M3, Two Ports, 2023)",
    ),
    (
        "Mac15,5",
        "j434ap",
        0x2A,
        0x8122,
        "iMac 24-inch (M3, Four Ports, 2023)",
    ),
    (
        "Mac15,12",
        "j613ap",
        0x30,
        0x8122,
        "MacBook Air (13-inch, M3, 2024)",
    ),
    (
        "Mac15,13",
        "j615ap",
        0x32,
        0x8122,
        "MacBook Air (15-inch, M3, 2024)",
    ),
    (
        "Mac15,6",
        "j514sap",
        0x04,
        0x6030,
        "MacBook Pro (14-inch, M3 Pro, Nov 2023)",
    ),
    (
        "Mac15,7",
        "j516sap",
        0x06,
        0x6030,
        "MacBook Pro (16-inch, M3 Pro, Nov 2023)",
    ),
    (
        "Mac15,8",
        "j514cap",
        0x44,
        0x6031,
        "MacBook Pro (14-inch, M3 Max, Nov 2023)",
    ),
    (
        "Mac15,9",
        "j516cap",
        0x46,
        0x6031,
        "MacBook Pro (16-inch, M3 Max, Nov 2023)",
    ),
    (
        "Mac15,14",
        "j575dap",
        0x44,
        0x6032,
        "Mac Studio (M3 Ultra, 2025)",
    ),
    (
        "Mac15,10",
        "j514map",
        0x44,
        0x6034,
        "MacBook Pro (14-inch, M3 Max, Nov 2023)",
    ),
    (
        "Mac15,11",
        "j516map",
        0x46,
        0x6034,
        "MacBook Pro (16-inch, M3 Max, Nov 2023)",
    ),
    (
        "Mac16,1",
        "j604ap",
        0x22,
        0x8132,
        "MacBook Pro (14-inch, M4, Nov 2024)",
    ),
    (
        "Mac16,2",
        "j623ap",
        0x24,
        0x8132,
        "iMac 24-inch (M4, Two Ports, 2024)",
    ),
    (
        "Mac16,3",
        "j624ap",
        0x26,
        0x8132,
        "iMac 24-inch (M4, Four Ports, 2024)",
    ),
    ("Mac16,10", "j773gap", 0x2A, 0x8132, "Mac mini (M4, 2024)"),
    (
        "Mac16,12",
        "j713ap",
        0x2C,
        0x8132,
        "MacBook Air (13-inch, M4, 2025)",
    ),
    (
        "Mac16,13",
        "j715ap",
        0x2E,
        0x8132,
        "MacBook Air (15-inch, M4, 2025)",
    ),
    (
        "Mac16,7",
        "j616sap",
        0x06,
        0x6040,
        "MacBook Pro (16-inch, M4 Pro, Nov 2024)",
    ),
    (
        "Mac16,8",
        "j614sap",
        0x04,
        0x6040,
        "MacBook Pro (14-inch, M4 Pro, Nov 2024)",
    ),
    (
        "Mac16,11",
        "j773sap",
        0x02,
        0x6040,
        "Mac mini (M4 Pro, 2024)",
    ),
    (
        "Mac16,5",
        "j616cap",
        0x06,
        0x6041,
        "MacBook Pro (16-inch, M4 Max, Nov 2024)",
    ),
    (
        "Mac16,6",
        "j614cap",
        0x04,
        0x6041,
        "MacBook Pro (14-inch, M4 Max, Nov 2024)",
    ),
    (
        "Mac16,9",
        "j575cap",
        0x02,
        0x6041,
        "Mac Studio (M4 Max, 2025)",
    ),
    (
        "Mac17,2",
        "j704ap",
        0x22,
        0x8142,
        "MacBook Pro (14-inch, M5, 2025)",
    ),
    (
        "VirtualMac2,1",
        "vma2macosap",
        0x20,
        0xFE00,
        "Apple Virtual Machine 1",
    ),
];

#[test]
fn every_spec_row_identifies_through_the_serial_string() {
    assert_eq!(SPEC_ROWS.len(), 50);
    for &(product_type, board, bdid, cpid, name) in SPEC_ROWS {
        let serial = format!(
            "SDOM:01 CPID:{cpid:04X} CPRV:11 CPFM:03 SCEP:01 BDID:{bdid:02X} ECID:001C19983A28A01E IBFL:3C SRTG:[iBoot-11881.0.0.0.1]"
        );
        let id = DeviceIdentity::from_strings(Some(AppleMode::Dfu), &serial, None);
        let m = id
            .require_model()
            .unwrap_or_else(|e| panic!("{product_type}: {e}"));
        assert_eq!(m.product_type, product_type);
        assert_eq!(m.board_config, board);
        assert_eq!(m.name, name);
        assert_eq!((m.cpid, m.bdid), (cpid, bdid));
        let expected_kind = if product_type == "VirtualMac2,1" {
            ModelKind::VirtualMac
        } else {
            ModelKind::AppleSiliconMac
        };
        assert_eq!(m.kind, expected_kind, "{product_type}");

        // The same Mac seen through its port controller (Port DFU packs CPID/BDID into BDID).
        let packed = (bdid << 24) | (cpid << 8) | 0x01;
        let port = DeviceIdentity::from_strings(
            Some(AppleMode::PortDfu),
            &format!("CPID:1234 BDID:{packed:X} ECID:001C19983A28A01E"),
            None,
        );
        assert_eq!(port.model.map(|m| m.board_config), Some(board));
    }
}

#[test]
fn non_macs_are_not_a_mac() {
    for (cpid, bdid, product_type, board) in [
        (0x8112, 0x42, "RealityDevice14,1", "n301ap"),
        (0x8142, 0x42, "RealityDevice17,1", "n301aap"),
        (0x8030, 0x22, "AppleDisplay2,1", "j327ap"),
        (0xFE01, 0x90, "iPhone99,11", "vresearch101ap"),
    ] {
        let id = DeviceIdentity::from_strings(
            Some(AppleMode::Dfu),
            &format!("CPID:{cpid:04X} BDID:{bdid:02X}"),
            None,
        );
        let m = id.require_model().unwrap();
        assert_eq!((m.product_type, m.board_config), (product_type, board));
        assert_eq!(m.kind, ModelKind::NotAMac);
        assert!(matches!(
            id.require_mac(),
            Err(IdentityError::NotAMac { .. })
        ));
        assert!(id
            .situation()
            .to_string()
            .starts_with("this is not a Mac ("));
    }
}

#[test]
fn unknown_model_names_both_values() {
    let id = DeviceIdentity::from_strings(Some(AppleMode::Dfu), "CPID:8152 BDID:2C", None);
    assert_eq!(id.model, None);
    let e = id.require_model().unwrap_err();
    assert_eq!(
        e,
        IdentityError::UnknownModel {
            cpid: 0x8152,
            bdid: 0x2c
        }
    );
    let text = e.to_string();
    assert!(text.contains("CPID 0x8152"), "{text}");
    assert!(text.contains("BDID 0x2c"), "{text}");
}

#[test]
fn real_strings_from_issue_threads() {
    // The fixture file's serial strings (iPhone/iPad: none of them is a Mac).
    let path = shared().join("fixtures/usb/usb-ids-and-serial-strings-from-issues.txt");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));

    let line = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Serial Number: "))
        .expect("iPhone 6 serial line");
    let id = DeviceIdentity::from_strings(Some(AppleMode::Dfu), line, None);
    assert_eq!(id.cpid, Some(0x7000));
    assert_eq!(id.bdid, Some(0));
    assert_eq!(id.ecid, Some(0x0002_2D3C_1098_1026));
    assert_eq!(id.srtg.as_deref(), Some("iBoot-1992.0.0.1.19"));
    assert_eq!(id.model, None);
    assert!(matches!(
        id.require_model(),
        Err(IdentityError::UnknownModel {
            cpid: 0x7000,
            bdid: 0
        })
    ));

    let line = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("iSerial  4 "))
        .expect("iPhone 13 lsusb line");
    let id = DeviceIdentity::from_strings(Some(AppleMode::Dfu), line, None);
    assert_eq!(id.sdom, Some(1));
    assert_eq!(id.cpid, Some(0x8110));
    assert_eq!(id.bdid, Some(0x0a));
    // "ECID:[redacted]" is garbled, not zero.
    assert_eq!(id.ecid, None);
    assert_eq!(id.srtg.as_deref(), Some("iBoot-6338.0.0.200.19"));

    let line = text
        .lines()
        .find(|l| l.contains("_irecv_event_handler: found new:"))
        .expect("Windows device path line");
    let id = DeviceIdentity::from_strings(Some(AppleMode::Recovery), line, None);
    assert_eq!(id.cpid, Some(0x8132));
    assert_eq!(id.bdid, Some(0x0a));
    assert_eq!(id.ecid, Some(626_559_404_277_788));
    assert_eq!(id.srnm.as_deref(), Some("l3412n76qj"));
    // iPad16,4 is not in our table (an iPad sharing the M4's CPID): unknown, not a Mac.
    assert_eq!(id.model, None);
}
