//! Apple's mesu macOS IPSW catalog: every fixture snapshot, hand-made shapes, damaged input.

use std::path::PathBuf;

use restore_agent::catalog::{CatalogError, FirmwareEntry, MesuCatalog};

fn shared() -> PathBuf {
    match std::env::var_os("MACRESCUE_SHARED") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared")),
    }
}

fn fixture(name: &str) -> Vec<u8> {
    let path = shared().join("fixtures/catalogs").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

const SNAPSHOT_15_4_1: &str = "com_apple_macOSIPSW.2025-06-07.15.4.1_24E263.xml";
const SNAPSHOT_26_2: &str = "com_apple_macOSIPSW.2025-12-21.26.2_25C56.xml";
const SNAPSHOT_26_3: &str = "com_apple_macOSIPSW.2026-03-12.26.3.1+26.3.2.xml";
const MOBILE_ASSET: &str = "com_apple_MobileAsset_MacSoftwareUpdate.26.2_25C56.xml";

const URL_15_4_1: &str = "https://updates.cdn-apple.com/2025SpringFCS/fullrestores/082-23340/61923341-EE73-4C6E-BB3E-DAB3069548BF/UniversalMac_15.4.1_24E263_Restore.ipsw";
const URL_26_2: &str = "https://updates.cdn-apple.com/2025FallFCS/fullrestores/093-37399/E144C918-CF99-4BBC-B1D0-3E739B9A3F2D/UniversalMac_26.2_25C56_Restore.ipsw";
const URL_26_3_1: &str = "https://updates.cdn-apple.com/2026WinterFCS/fullrestores/047-88313/2E098049-1731-4415-A206-546D09301973/UniversalMac_26.3.1_25D2128_Restore.ipsw";
const URL_26_3_2: &str = "https://updates.cdn-apple.com/2026WinterFCS/fullrestores/047-94879/40A2B65E-4E49-4EAA-8BEC-62A305007488/UniversalMac_26.3.2_25D2140_Restore.ipsw";

fn entry(version: &str, build: &str, url: &str, sha1: Option<&str>) -> FirmwareEntry {
    FirmwareEntry {
        version: version.into(),
        build: build.into(),
        url: url.into(),
        sha1: sha1.map(|h| {
            let mut d = [0u8; 20];
            hex::decode_to_slice(h, &mut d).unwrap();
            d
        }),
    }
}

#[test]
fn snapshot_15_4_1() {
    let catalog = MesuCatalog::parse(&fixture(SNAPSHOT_15_4_1)).unwrap();
    assert_eq!(catalog.product_types().count(), 48);
    let sha = Some("0b60b702fa2b7665161d80582ac60e2ed284df6f");
    for product in ["Macmini9,1", "Mac14,2", "Mac16,12", "MacBookPro18,3"] {
        assert_eq!(
            catalog.builds_for(product).unwrap(),
            vec![entry("15.4.1", "24E263", URL_15_4_1, sha)],
            "{product}"
        );
    }
    // Apple gives the virtual Mac no checksum.
    assert_eq!(
        catalog.builds_for("VirtualMac2,1").unwrap(),
        vec![entry("15.4.1", "24E263", URL_15_4_1, None)]
    );
    // Mac17,2 appeared only in later snapshots.
    let err = catalog.builds_for("Mac17,2").unwrap_err();
    assert!(matches!(err, CatalogError::UnknownProductType { .. }));
    assert_eq!(
        err.to_string(),
        "Mac17,2 is not in Apple's catalog: pass --ipsw or --build"
    );
}

#[test]
fn snapshot_26_2() {
    let catalog = MesuCatalog::parse(&fixture(SNAPSHOT_26_2)).unwrap();
    assert_eq!(catalog.product_types().count(), 49);
    let sha = Some("f034b05ce26abe3c8e5ae8f1f6574119b10cafbe");
    for product in ["Macmini9,1", "Mac14,2", "Mac17,2", "iMac21,1"] {
        assert_eq!(
            catalog.builds_for(product).unwrap(),
            vec![entry("26.2", "25C56", URL_26_2, sha)],
            "{product}"
        );
    }
    let only = &catalog.builds_for("Mac17,2").unwrap()[0];
    assert_eq!(
        only.sha1_hex().as_deref(),
        Some("f034b05ce26abe3c8e5ae8f1f6574119b10cafbe")
    );
    assert_eq!(
        only.file_name(),
        Some("UniversalMac_26.2_25C56_Restore.ipsw")
    );
}

#[test]
fn snapshot_26_3_has_two_builds_across_models() {
    let catalog = MesuCatalog::parse(&fixture(SNAPSHOT_26_3)).unwrap();
    assert_eq!(catalog.product_types().count(), 56);
    assert_eq!(
        catalog.builds_for("Macmini9,1").unwrap(),
        vec![entry(
            "26.3.1",
            "25D2128",
            URL_26_3_1,
            Some("d7fd6eded02a7534581e4bee5f25ba9784cce408")
        )]
    );
    // Only Mac17,5 was offered 26.3.2 in this snapshot.
    assert_eq!(
        catalog.builds_for("Mac17,5").unwrap(),
        vec![entry(
            "26.3.2",
            "25D2140",
            URL_26_3_2,
            Some("338037f50ea1d6b39e7e9f82a5276e8b1f693ee8")
        )]
    );
    assert_eq!(
        catalog.builds_for("VirtualMac2,1").unwrap(),
        vec![entry("26.3.1", "25D2128", URL_26_3_1, None)]
    );
}

#[test]
fn every_product_type_of_every_snapshot_has_a_usable_entry() {
    for name in [SNAPSHOT_15_4_1, SNAPSHOT_26_2, SNAPSHOT_26_3] {
        let catalog = MesuCatalog::parse(&fixture(name)).unwrap();
        let products: Vec<String> = catalog.product_types().map(str::to_owned).collect();
        for product in products {
            let builds = catalog.builds_for(&product).unwrap();
            // The Unknown/Universal duplicate of the current build must collapse.
            assert_eq!(builds.len(), 1, "{name} {product}: {builds:?}");
            let build = &builds[0];
            assert!(build.url.starts_with("https://updates.cdn-apple.com/"));
            assert_eq!(
                build.file_name().map(str::to_owned),
                Some(restore_agent::catalog::ipsw_file_name(
                    &build.version,
                    &build.build
                ))
            );
            assert_eq!(
                build.sha1.is_none(),
                product == "VirtualMac2,1",
                "{product}"
            );
        }
    }
}

#[test]
fn mobile_asset_catalog_is_refused_with_guidance() {
    let err = MesuCatalog::parse(&fixture(MOBILE_ASSET)).unwrap_err();
    assert!(matches!(
        err,
        CatalogError::NotAnIpswCatalog {
            missing: "MobileDeviceSoftwareVersionsByVersion"
        }
    ));
    assert!(err.to_string().contains("pass --ipsw"), "{err}");
}

#[test]
fn damaged_catalogs_error_without_panicking() {
    let real = fixture(SNAPSHOT_26_3);
    for cut in [
        0,
        1,
        10,
        100,
        1000,
        real.len() / 2,
        real.len() - 20,
        real.len() - 3,
    ] {
        assert!(
            MesuCatalog::parse(&real[..cut]).is_err(),
            "prefix of {cut} bytes"
        );
    }
    for garbage in [&b"\x00\xff garbage"[..], b"{\"json\": true}", b"bplist00"] {
        assert!(MesuCatalog::parse(garbage).is_err());
    }
}

fn plist(body: &str) -> Vec<u8> {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">{body}</plist>"#
    )
    .into_bytes()
}

fn restore(version: &str, build: &str, sha: &str) -> String {
    format!(
        "<dict><key>Restore</key><dict>\
         <key>BuildVersion</key><string>{build}</string>\
         <key>ProductVersion</key><string>{version}</string>\
         <key>FirmwareURL</key><string>https://example.invalid/UniversalMac_{version}_{build}_Restore.ipsw</string>\
         <key>FirmwareSHA1</key><string>{sha}</string>\
         </dict></dict>"
    )
}

fn catalog_with(schemas: &[(&str, &str)]) -> Vec<u8> {
    let mut by_version = String::new();
    for (schema, products) in schemas {
        by_version.push_str(&format!(
            "<key>{schema}</key><dict><key>MobileDeviceSoftwareVersions</key><dict>{products}</dict></dict>"
        ));
    }
    plist(&format!(
        "<dict><key>MobileDeviceSoftwareVersionsByVersion</key><dict>{by_version}</dict></dict>"
    ))
}

const SHA_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const SHA_B: &str = "BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB";
const SHA_C: &str = "cccccccccccccccccccccccccccccccccccccccc";

fn url(version: &str, build: &str) -> String {
    format!("https://example.invalid/UniversalMac_{version}_{build}_Restore.ipsw")
}

#[test]
fn several_builds_sort_newest_first_and_same_as_resolves() {
    let products = format!(
        "<key>Mac14,2</key><dict>\
           <key>25C56</key>{}\
           <key>25D2128</key>{}\
           <key>25D125</key>{}\
           <key>Alias</key><dict><key>SameAs</key><string>25D2128</string></dict>\
           <key>Loop1</key><dict><key>SameAs</key><string>Loop2</string></dict>\
           <key>Loop2</key><dict><key>SameAs</key><string>Loop1</string></dict>\
           <key>UpdateOnly</key><dict><key>Update</key><dict/></dict>\
         </dict>",
        restore("26.2", "25C56", SHA_A),
        restore("26.3.1", "25D2128", SHA_B),
        restore("26.3", "25D125", SHA_C),
    );
    let catalog = MesuCatalog::parse(&catalog_with(&[("1", &products)])).unwrap();
    let builds = catalog.builds_for("Mac14,2").unwrap();
    assert_eq!(
        builds,
        vec![
            entry(
                "26.3.1",
                "25D2128",
                &url("26.3.1", "25D2128"),
                Some(&SHA_B.to_lowercase())
            ),
            entry("26.3", "25D125", &url("26.3", "25D125"), Some(SHA_C)),
            entry("26.2", "25C56", &url("26.2", "25C56"), Some(SHA_A)),
        ]
    );
}

#[test]
fn largest_numeric_schema_key_wins() {
    let old = format!(
        "<key>Mac14,2</key><dict><key>1</key>{}</dict>",
        restore("15.0", "24A335", SHA_A)
    );
    let new = format!(
        "<key>Mac14,2</key><dict><key>1</key>{}</dict>",
        restore("26.0", "25A354", SHA_B)
    );
    let catalog =
        MesuCatalog::parse(&catalog_with(&[("2", &old), ("10", &new), ("x", &old)])).unwrap();
    assert_eq!(catalog.builds_for("Mac14,2").unwrap()[0].build, "25A354");

    let err = MesuCatalog::parse(&catalog_with(&[("x", &old)])).unwrap_err();
    assert!(
        matches!(err, CatalogError::NotAnIpswCatalog { .. }),
        "{err}"
    );
}

#[test]
fn universal_only_shape_is_used() {
    let products = format!(
        "<key>Mac99,1</key><dict><key>Unknown</key><dict><key>Universal</key>{}</dict></dict>",
        restore("27.0", "26A100", SHA_A)
    );
    let catalog = MesuCatalog::parse(&catalog_with(&[("1", &products)])).unwrap();
    assert_eq!(
        catalog.builds_for("Mac99,1").unwrap(),
        vec![entry("27.0", "26A100", &url("27.0", "26A100"), Some(SHA_A))]
    );
}

#[test]
fn bad_entries_are_skipped_or_reported() {
    let products = format!(
        "<key>Mac14,2</key><dict><key>25C56</key>{}<key>25D2128</key>{}</dict>\
         <key>Mac14,3</key><dict><key>25C56</key>{}</dict>\
         <key>Mac14,5</key><dict><key>25C56</key><string>not a dict</string></dict>\
         <key>Mac14,6</key><string>not a dict</string>",
        restore("26.2", "25C56", "1234"),
        restore("26.3.1", "25D2128", SHA_B),
        restore("26.2", "25C56", "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz"),
    );
    let catalog = MesuCatalog::parse(&catalog_with(&[("1", &products)])).unwrap();
    // One good build survives next to a bad checksum.
    let builds = catalog.builds_for("Mac14,2").unwrap();
    assert_eq!(builds.len(), 1);
    assert_eq!(builds[0].build, "25D2128");

    let err = catalog.builds_for("Mac14,3").unwrap_err();
    assert_eq!(
        err.to_string(),
        "Mac14,3 has no usable restore image in the catalog (25C56: SHA-1 \
         \"zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz\" is not 40 hex digits): \
         pass --ipsw or --build"
    );
    assert!(matches!(
        catalog.builds_for("Mac14,5"),
        Err(CatalogError::NoUsableEntries { .. })
    ));
    assert!(matches!(
        catalog.builds_for("Mac14,6"),
        Err(CatalogError::UnknownProductType { .. })
    ));
}

#[test]
fn non_http_urls_are_refused() {
    let products = "<key>Mac14,2</key><dict><key>1</key><dict><key>Restore</key><dict>\
         <key>BuildVersion</key><string>25C56</string>\
         <key>ProductVersion</key><string>26.2</string>\
         <key>FirmwareURL</key><string>protected://x.ipsw</string>\
         </dict></dict></dict>";
    let catalog = MesuCatalog::parse(&catalog_with(&[("1", products)])).unwrap();
    let err = catalog.builds_for("Mac14,2").unwrap_err();
    assert!(err.to_string().contains("not an http(s) URL"), "{err}");
}
