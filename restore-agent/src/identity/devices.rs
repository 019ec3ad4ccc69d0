//! The CPID+BDID → model table (protocol.md §1.5).
//!
//! Sources, row by row:
//! * Apple Silicon Macs, VirtualMac2,1 and the four non-Mac rows: libirecovery's device table at
//!   04d04f7 as transcribed in protocol.md §1.5 (product type, board config and name verbatim).
//!   The non-Mac rows' names are ours: the spec gives only product type and board.
//! * Intel Macs with a T2 (CPID 0x8012): the `DeviceMap` of macOS 26.2's `Restore.plist`
//!   (fixtures/manifests/macOS_26.2_25C56_SharedSupport). That file names only the board config
//!   (`j152fmacap` …), not the product type or a marketing name, and we do not guess them: the
//!   product type column repeats the board config and the name says what we know.
//!
//! Lookup takes the first matching row, like libirecovery, so order matters where rows could
//! collide (none do today; a test checks that).

use super::{MacModel, ModelKind};
use ModelKind::{AppleSiliconMac, IntelT2Mac, NotAMac, VirtualMac};

const fn row(
    product_type: &'static str,
    board_config: &'static str,
    cpid: u32,
    bdid: u32,
    name: &'static str,
    kind: ModelKind,
) -> MacModel {
    MacModel {
        product_type,
        board_config,
        name,
        cpid,
        bdid,
        kind,
    }
}

/// Every known row, Macs first.
pub static MODELS: &[MacModel] = &[
    row(
        "ADP3,2",
        "j273aap",
        0x8027,
        0x42,
        "Developer Transition Kit (2020)",
        AppleSiliconMac,
    ),
    row(
        "Macmini9,1",
        "j274ap",
        0x8103,
        0x22,
        "Mac mini (M1, 2020)",
        AppleSiliconMac,
    ),
    row(
        "MacBookPro17,1",
        "j293ap",
        0x8103,
        0x24,
        "MacBook Pro (M1, 13-inch, 2020)",
        AppleSiliconMac,
    ),
    row(
        "MacBookAir10,1",
        "j313ap",
        0x8103,
        0x26,
        "MacBook Air (M1, 2020)",
        AppleSiliconMac,
    ),
    row(
        "iMac21,1",
        "j456ap",
        0x8103,
        0x28,
        "iMac 24-inch (M1, Two Ports, 2021)",
        AppleSiliconMac,
    ),
    row(
        "iMac21,2",
        "j457ap",
        0x8103,
        0x2A,
        "iMac 24-inch (M1, Four Ports, 2021)",
        AppleSiliconMac,
    ),
    row(
        "MacBookPro18,1",
        "j316sap",
        0x6000,
        0x0A,
        "MacBook Pro (M1 Pro, 16-inch, 2021)",
        AppleSiliconMac,
    ),
    row(
        "MacBookPro18,3",
        "j314sap",
        0x6000,
        0x08,
        "MacBook Pro (M1 Pro, 14-inch, 2021)",
        AppleSiliconMac,
    ),
    row(
        "MacBookPro18,2",
        "j316cap",
        0x6001,
        0x0A,
        "MacBook Pro (M1 Max, 16-inch, 2021)",
        AppleSiliconMac,
    ),
    row(
        "MacBookPro18,4",
        "j314cap",
        0x6001,
        0x08,
        "MacBook Pro (M1 Max, 14-inch, 2021)",
        AppleSiliconMac,
    ),
    row(
        "Mac13,1",
        "j375cap",
        0x6001,
        0x04,
        "Mac Studio (M1 Max, 2022)",
        AppleSiliconMac,
    ),
    row(
        "Mac13,2",
        "j375dap",
        0x6002,
        0x0C,
        "Mac Studio (M1 Ultra, 2022)",
        AppleSiliconMac,
    ),
    row(
        "Mac14,2",
        "j413ap",
        0x8112,
        0x28,
        "MacBook Air (M2, 2022)",
        AppleSiliconMac,
    ),
    row(
        "Mac14,7",
        "j493ap",
        0x8112,
        0x2A,
        "MacBook Pro (M2, 13-inch, 2022)",
        AppleSiliconMac,
    ),
    row(
        "Mac14,3",
        "j473ap",
        0x8112,
        0x24,
        "Mac mini (M2, 2023)",
        AppleSiliconMac,
    ),
    row(
        "Mac14,15",
        "j415ap",
        0x8112,
        0x2E,
        "MacBook Air (M2, 15-inch, 2023)",
        AppleSiliconMac,
    ),
    row(
        "Mac14,9",
        "j414sap",
        0x6020,
        0x04,
        "MacBook Pro (14-inch, M2 Pro, 2023)",
        AppleSiliconMac,
    ),
    row(
        "Mac14,10",
        "j416sap",
        0x6020,
        0x06,
        "MacBook Pro (16-inch, M2 Pro, 2023)",
        AppleSiliconMac,
    ),
    row(
        "Mac14,12",
        "j474sap",
        0x6020,
        0x02,
        "Mac mini (M2 Pro, 2023)",
        AppleSiliconMac,
    ),
    row(
        "Mac14,5",
        "j414cap",
        0x6021,
        0x04,
        "MacBook Pro (14-inch, M2 Max, 2023)",
        AppleSiliconMac,
    ),
    row(
        "Mac14,6",
        "j416cap",
        0x6021,
        0x06,
        "MacBook Pro (16-inch, M2 Max, 2023)",
        AppleSiliconMac,
    ),
    row(
        "Mac14,13",
        "j475cap",
        0x6021,
        0x0A,
        "Mac Studio (M2 Max, 2023)",
        AppleSiliconMac,
    ),
    row(
        "Mac14,8",
        "j180dap",
        0x6022,
        0x08,
        "Mac Pro (2023)",
        AppleSiliconMac,
    ),
    row(
        "Mac14,14",
        "j475dap",
        0x6022,
        0x0A,
        "Mac Studio (M2 Ultra, 2023)",
        AppleSiliconMac,
    ),
    row(
        "Mac15,3",
        "j504ap",
        0x8122,
        0x22,
        "MacBook Pro (14-inch, M3, Nov 2023)",
        AppleSiliconMac,
    ),
    row(
        "Mac15,4",
        "j433ap",
        0x8122,
        0x28,
        "iMac 24-inch (M3, Two Ports, 2023)",
        AppleSiliconMac,
    ),
    row(
        "Mac15,5",
        "j434ap",
        0x8122,
        0x2A,
        "iMac 24-inch (M3, Four Ports, 2023)",
        AppleSiliconMac,
    ),
    row(
        "Mac15,12",
        "j613ap",
        0x8122,
        0x30,
        "MacBook Air (13-inch, M3, 2024)",
        AppleSiliconMac,
    ),
    row(
        "Mac15,13",
        "j615ap",
        0x8122,
        0x32,
        "MacBook Air (15-inch, M3, 2024)",
        AppleSiliconMac,
    ),
    row(
        "Mac15,6",
        "j514sap",
        0x6030,
        0x04,
        "MacBook Pro (14-inch, M3 Pro, Nov 2023)",
        AppleSiliconMac,
    ),
    row(
        "Mac15,7",
        "j516sap",
        0x6030,
        0x06,
        "MacBook Pro (16-inch, M3 Pro, Nov 2023)",
        AppleSiliconMac,
    ),
    row(
        "Mac15,8",
        "j514cap",
        0x6031,
        0x44,
        "MacBook Pro (14-inch, M3 Max, Nov 2023)",
        AppleSiliconMac,
    ),
    row(
        "Mac15,9",
        "j516cap",
        0x6031,
        0x46,
        "MacBook Pro (16-inch, M3 Max, Nov 2023)",
        AppleSiliconMac,
    ),
    row(
        "Mac15,14",
        "j575dap",
        0x6032,
        0x44,
        "Mac Studio (M3 Ultra, 2025)",
        AppleSiliconMac,
    ),
    row(
        "Mac15,10",
        "j514map",
        0x6034,
        0x44,
        "MacBook Pro (14-inch, M3 Max, Nov 2023)",
        AppleSiliconMac,
    ),
    row(
        "Mac15,11",
        "j516map",
        0x6034,
        0x46,
        "MacBook Pro (16-inch, M3 Max, Nov 2023)",
        AppleSiliconMac,
    ),
    row(
        "Mac16,1",
        "j604ap",
        0x8132,
        0x22,
        "MacBook Pro (14-inch, M4, Nov 2024)",
        AppleSiliconMac,
    ),
    row(
        "Mac16,2",
        "j623ap",
        0x8132,
        0x24,
        "iMac 24-inch (M4, Two Ports, 2024)",
        AppleSiliconMac,
    ),
    row(
        "Mac16,3",
        "j624ap",
        0x8132,
        0x26,
        "iMac 24-inch (M4, Four Ports, 2024)",
        AppleSiliconMac,
    ),
    row(
        "Mac16,10",
        "j773gap",
        0x8132,
        0x2A,
        "Mac mini (M4, 2024)",
        AppleSiliconMac,
    ),
    row(
        "Mac16,12",
        "j713ap",
        0x8132,
        0x2C,
        "MacBook Air (13-inch, M4, 2025)",
        AppleSiliconMac,
    ),
    row(
        "Mac16,13",
        "j715ap",
        0x8132,
        0x2E,
        "MacBook Air (15-inch, M4, 2025)",
        AppleSiliconMac,
    ),
    row(
        "Mac16,7",
        "j616sap",
        0x6040,
        0x06,
        "MacBook Pro (16-inch, M4 Pro, Nov 2024)",
        AppleSiliconMac,
    ),
    row(
        "Mac16,8",
        "j614sap",
        0x6040,
        0x04,
        "MacBook Pro (14-inch, M4 Pro, Nov 2024)",
        AppleSiliconMac,
    ),
    row(
        "Mac16,11",
        "j773sap",
        0x6040,
        0x02,
        "Mac mini (M4 Pro, 2024)",
        AppleSiliconMac,
    ),
    row(
        "Mac16,5",
        "j616cap",
        0x6041,
        0x06,
        "MacBook Pro (16-inch, M4 Max, Nov 2024)",
        AppleSiliconMac,
    ),
    row(
        "Mac16,6",
        "j614cap",
        0x6041,
        0x04,
        "MacBook Pro (14-inch, M4 Max, Nov 2024)",
        AppleSiliconMac,
    ),
    row(
        "Mac16,9",
        "j575cap",
        0x6041,
        0x02,
        "Mac Studio (M4 Max, 2025)",
        AppleSiliconMac,
    ),
    row(
        "Mac17,2",
        "j704ap",
        0x8142,
        0x22,
        "MacBook Pro (14-inch, M5, 2025)",
        AppleSiliconMac,
    ),
    row(
        "VirtualMac2,1",
        "vma2macosap",
        0xFE00,
        0x20,
        "Apple Virtual Machine 1",
        VirtualMac,
    ),
    // Share Apple Silicon CPIDs but are not Macs: never restore them with a Mac IPSW.
    row(
        "RealityDevice14,1",
        "n301ap",
        0x8112,
        0x42,
        "Apple Vision Pro",
        NotAMac,
    ),
    row(
        "RealityDevice17,1",
        "n301aap",
        0x8142,
        0x42,
        "Apple Vision Pro (M5)",
        NotAMac,
    ),
    row(
        "AppleDisplay2,1",
        "j327ap",
        0x8030,
        0x22,
        "Apple Studio Display",
        NotAMac,
    ),
    row(
        "iPhone99,11",
        "vresearch101ap",
        0xFE01,
        0x90,
        "Apple security research virtual device",
        NotAMac,
    ),
    // Intel Macs' T2 side, from Restore.plist's DeviceMap (Platform x86_64).
    row(
        "j152fmacap",
        "j152fmacap",
        0x8012,
        0x3A,
        "Intel Mac with T2 (j152fmacap)",
        IntelT2Mac,
    ),
    row(
        "j160macap",
        "j160macap",
        0x8012,
        0x0F,
        "Intel Mac with T2 (j160macap)",
        IntelT2Mac,
    ),
    row(
        "j185fmacap",
        "j185fmacap",
        0x8012,
        0x23,
        "Intel Mac with T2 (j185fmacap)",
        IntelT2Mac,
    ),
    row(
        "j185macap",
        "j185macap",
        0x8012,
        0x22,
        "Intel Mac with T2 (j185macap)",
        IntelT2Mac,
    ),
    row(
        "j214kmacap",
        "j214kmacap",
        0x8012,
        0x3E,
        "Intel Mac with T2 (j214kmacap)",
        IntelT2Mac,
    ),
    row(
        "j214macap",
        "j214macap",
        0x8012,
        0x1E,
        "Intel Mac with T2 (j214macap)",
        IntelT2Mac,
    ),
    row(
        "j215macap",
        "j215macap",
        0x8012,
        0x38,
        "Intel Mac with T2 (j215macap)",
        IntelT2Mac,
    ),
    row(
        "x86legacymacap",
        "x86legacymacap",
        0x8012,
        0xF0,
        "Intel Mac, legacy catch-all entry (x86legacymacap)",
        IntelT2Mac,
    ),
];

/// The model for a chip ID and board ID, first matching row wins.
pub fn lookup(cpid: u32, bdid: u32) -> Option<&'static MacModel> {
    MODELS.iter().find(|m| m.cpid == cpid && m.bdid == bdid)
}

/// The model whose board config is `board` (case-insensitive, as `Info.DeviceClass` is compared).
pub fn by_board_config(board: &str) -> Option<&'static MacModel> {
    MODELS
        .iter()
        .find(|m| m.board_config.eq_ignore_ascii_case(board))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn no_two_rows_share_cpid_and_bdid() {
        let mut seen = HashSet::new();
        for m in MODELS {
            assert!(
                seen.insert((m.cpid, m.bdid)),
                "duplicate CPID {:#x} BDID {:#x} ({})",
                m.cpid,
                m.bdid,
                m.board_config
            );
        }
    }

    #[test]
    fn board_configs_are_unique_and_lowercase() {
        let mut seen = HashSet::new();
        for m in MODELS {
            assert_eq!(m.board_config, m.board_config.to_ascii_lowercase());
            assert!(seen.insert(m.board_config), "duplicate {}", m.board_config);
        }
    }

    #[test]
    fn lookups() {
        let m = lookup(0x8103, 0x26).unwrap();
        assert_eq!(
            (m.product_type, m.board_config, m.name, m.kind),
            (
                "MacBookAir10,1",
                "j313ap",
                "MacBook Air (M1, 2020)",
                AppleSiliconMac
            )
        );
        assert_eq!(lookup(0x8112, 0x42).unwrap().kind, NotAMac);
        assert_eq!(lookup(0xFE00, 0x20).unwrap().kind, VirtualMac);
        assert_eq!(lookup(0x8012, 0x0F).unwrap().kind, IntelT2Mac);
        assert_eq!(lookup(0x8103, 0x99), None);
        assert_eq!(by_board_config("J773gAP").unwrap().product_type, "Mac16,10");
        assert_eq!(by_board_config("j999ap"), None);
    }
}
