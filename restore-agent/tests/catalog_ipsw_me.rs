//! ipsw.me v4 device JSON (protocol.md §9.1), written here in the shape the service returns.

use restore_agent::catalog::{ipsw_me_device_url, parse_ipsw_me_device, CatalogError};

const DEVICE: &str = r#"{
  "name": "Mac mini (M1, 2020)",
  "identifier": "Macmini9,1",
  "boardconfig": "J274AP",
  "platform": "t8103",
  "cpid": 33027,
  "bdid": 34,
  "firmwares": [
    {
      "identifier": "Macmini9,1",
      "version": "26.2",
      "buildid": "25C56",
      "sha1sum": "f034b05ce26abe3c8e5ae8f1f6574119b10cafbe",
      "md5sum": "00112233445566778899aabbccddeeff",
      "filesize": 18000000000,
      "url": "https://updates.cdn-apple.com/2025FallFCS/fullrestores/093-37399/E144C918-CF99-4BBC-B1D0-3E739B9A3F2D/UniversalMac_26.2_25C56_Restore.ipsw",
      "releasedate": "2025-12-12T18:00:00Z",
      "uploaddate": "2025-12-12T17:00:00Z",
      "signed": true
    },
    {
      "identifier": "Macmini9,1",
      "version": "15.4.1",
      "buildid": "24E263",
      "sha1sum": "0b60b702fa2b7665161d80582ac60e2ed284df6f",
      "url": "https://updates.cdn-apple.com/2025SpringFCS/fullrestores/082-23340/61923341-EE73-4C6E-BB3E-DAB3069548BF/UniversalMac_15.4.1_24E263_Restore.ipsw",
      "signed": false
    },
    {
      "identifier": "Macmini9,1",
      "version": "26.10",
      "buildid": "25Z1",
      "sha1sum": "1111111111111111111111111111111111111111",
      "url": "https://example.invalid/UniversalMac_26.10_25Z1_Restore.ipsw",
      "signed": false
    },
    {
      "identifier": "Macmini9,1",
      "version": "26.3.1",
      "buildid": "25D2128",
      "sha1sum": "D7FD6EDED02A7534581E4BEE5F25BA9784CCE408",
      "url": "https://updates.cdn-apple.com/2026WinterFCS/fullrestores/047-88313/2E098049-1731-4415-A206-546D09301973/UniversalMac_26.3.1_25D2128_Restore.ipsw",
      "signed": true
    },
    { "version": "26.0", "buildid": "25A354", "sha1sum": "short", "url": "https://example.invalid/a.ipsw" },
    { "version": "26.0", "buildid": "25A354", "url": "protected://a.ipsw" },
    { "version": 26, "buildid": null },
    "not an object"
  ]
}"#;

#[test]
fn lists_every_firmware_newest_first_ignoring_signed() {
    let builds = parse_ipsw_me_device(DEVICE.as_bytes(), "Macmini9,1").unwrap();
    let summary: Vec<(&str, &str, Option<String>)> = builds
        .iter()
        .map(|b| (b.version.as_str(), b.build.as_str(), b.sha1_hex()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                "26.10",
                "25Z1",
                Some("1111111111111111111111111111111111111111".into())
            ),
            (
                "26.3.1",
                "25D2128",
                Some("d7fd6eded02a7534581e4bee5f25ba9784cce408".into())
            ),
            (
                "26.2",
                "25C56",
                Some("f034b05ce26abe3c8e5ae8f1f6574119b10cafbe".into())
            ),
            (
                "15.4.1",
                "24E263",
                Some("0b60b702fa2b7665161d80582ac60e2ed284df6f".into())
            ),
        ]
    );
    assert_eq!(
        builds[2].file_name(),
        Some("UniversalMac_26.2_25C56_Restore.ipsw")
    );
}

#[test]
fn answer_for_another_device_is_refused() {
    let err = parse_ipsw_me_device(DEVICE.as_bytes(), "Mac14,2").unwrap_err();
    assert!(matches!(err, CatalogError::WrongDevice { .. }));
    assert_eq!(
        err.to_string(),
        "ipsw.me answered for \"Macmini9,1\" while Mac14,2 was asked: \
         the answer is not for this Mac; pass --ipsw"
    );
}

#[test]
fn no_usable_firmware_is_an_error_naming_the_product() {
    let json = r#"{"identifier": "Mac14,2", "firmwares": []}"#;
    let err = parse_ipsw_me_device(json.as_bytes(), "Mac14,2").unwrap_err();
    assert_eq!(
        err.to_string(),
        "Mac14,2 has no usable restore image in the catalog (no entry has a restore image): \
         pass --ipsw or --build"
    );

    let json = r#"{"identifier": "Mac14,2"}"#;
    let err = parse_ipsw_me_device(json.as_bytes(), "Mac14,2").unwrap_err();
    assert!(matches!(err, CatalogError::NoUsableEntries { .. }), "{err}");
}

#[test]
fn malformed_json_errors_without_panicking() {
    for bad in ["", "{", "[]", "null", "{\"identifier\": 5}", "\u{0}"] {
        assert!(
            parse_ipsw_me_device(bad.as_bytes(), "Mac14,2").is_err(),
            "{bad:?}"
        );
    }
    for cut in 0..DEVICE.len() {
        let _ = parse_ipsw_me_device(&DEVICE.as_bytes()[..cut], "Macmini9,1");
    }
}

#[test]
fn device_url() {
    assert_eq!(
        ipsw_me_device_url("Mac14,2"),
        "https://api.ipsw.me/v4/device/Mac14,2"
    );
}
