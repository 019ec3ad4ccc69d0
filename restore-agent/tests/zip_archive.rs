//! The IPSW ZIP reader against archives from an independent writer (the `zip` crate) and
//! against damaged, truncated and garbage input.

use std::cell::RefCell;
use std::io::{self, Cursor, Read, Write};

use restore_agent::ipsw::{Ipsw, Method, RandomAccess, ZipArchive, ZipError, BUILD_MANIFEST};
use zip::write::SimpleFileOptions;
use zip::CompressionMethod;

/// Deterministic, poorly compressible bytes.
fn noise(len: usize, seed: u32) -> Vec<u8> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect()
}

fn manifest_bytes(components: usize) -> Vec<u8> {
    let mut text = String::from("<?xml version=\"1.0\"?><plist><dict>");
    for i in 0..components {
        text.push_str(&format!(
            "<key>Component{i}</key><string>Firmware/c{i}.im4p</string>"
        ));
    }
    text.push_str("</dict></plist>");
    text.into_bytes()
}

struct Built {
    bytes: Vec<u8>,
    manifest: Vec<u8>,
    os_image: Vec<u8>,
    ibss: Vec<u8>,
}

/// An IPSW-shaped archive: a deflated manifest, a stored "OS image", a directory, a deflated
/// firmware file, optionally forced into ZIP64 form and with an archive comment.
fn build(large_file: bool, comment: &str) -> Built {
    build_sized(large_file, comment, 2000, 300_000)
}

/// Damage tests open the archive thousands of times; a small one keeps them quick.
fn build_small() -> Built {
    build_sized(true, "", 100, 3_000)
}

fn build_sized(large_file: bool, comment: &str, components: usize, os_len: usize) -> Built {
    let manifest = manifest_bytes(components);
    let os_image = noise(os_len, 1);
    let ibss = noise(5_000, 2);
    let deflated = SimpleFileOptions::default()
        .compression_method(CompressionMethod::Deflated)
        .large_file(large_file);
    let stored = SimpleFileOptions::default()
        .compression_method(CompressionMethod::Stored)
        .large_file(large_file);
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    writer.start_file(BUILD_MANIFEST, deflated).unwrap();
    writer.write_all(&manifest).unwrap();
    writer.start_file("090-12345-678.dmg", stored).unwrap();
    writer.write_all(&os_image).unwrap();
    writer.add_directory("Firmware/dfu/", deflated).unwrap();
    writer
        .start_file("Firmware/dfu/iBSS.j274.RELEASE.im4p", deflated)
        .unwrap();
    writer.write_all(&ibss).unwrap();
    writer.start_file("empty.txt", deflated).unwrap();
    if !comment.is_empty() {
        writer.set_comment(comment);
    }
    let bytes = writer.finish().unwrap().into_inner();
    Built {
        bytes,
        manifest,
        os_image,
        ibss,
    }
}

fn read_all<R: RandomAccess>(archive: &ZipArchive<R>, name: &str) -> Vec<u8> {
    let entry = archive.entry(name).unwrap();
    archive.read_to_vec(entry, u64::MAX).unwrap()
}

fn check_contents(built: &Built) {
    let archive = ZipArchive::open(built.bytes.clone()).unwrap();
    let names: Vec<&str> = archive.entries().iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        [
            BUILD_MANIFEST,
            "090-12345-678.dmg",
            "Firmware/dfu/",
            "Firmware/dfu/iBSS.j274.RELEASE.im4p",
            "empty.txt"
        ]
    );
    let manifest = archive.entry(BUILD_MANIFEST).unwrap();
    assert_eq!(manifest.method, Method::Deflated);
    assert_eq!(manifest.uncompressed_size, built.manifest.len() as u64);
    assert!(manifest.compressed_size < manifest.uncompressed_size / 4);
    assert_eq!(manifest.crc32, crc32fast::hash(&built.manifest));
    assert_eq!(manifest.local_header_offset, 0);

    let os = archive.entry("090-12345-678.dmg").unwrap();
    assert_eq!(os.method, Method::Stored);
    assert_eq!(os.compressed_size, 300_000);
    assert_eq!(os.uncompressed_size, 300_000);
    assert!(archive.entry("Firmware/dfu/").unwrap().is_dir());

    assert_eq!(read_all(&archive, BUILD_MANIFEST), built.manifest);
    assert_eq!(read_all(&archive, "090-12345-678.dmg"), built.os_image);
    assert_eq!(
        read_all(&archive, "/Firmware/dfu/iBSS.j274.RELEASE.im4p"),
        built.ibss
    );
    assert_eq!(read_all(&archive, "./empty.txt"), b"");
    assert_eq!(read_all(&archive, "Firmware/dfu/"), b"");

    // Random access into the stored entry, as ASR does.
    let stored = archive.stored(os).unwrap();
    assert_eq!(stored.len(), 300_000);
    let mut buf = [0u8; 1000];
    stored.read_exact_at(123_456, &mut buf).unwrap();
    assert_eq!(&buf[..], &built.os_image[123_456..124_456]);
    stored.read_exact_at(299_000, &mut buf).unwrap();
    assert_eq!(&buf[..], &built.os_image[299_000..]);
    let err = stored.read_exact_at(299_001, &mut buf).unwrap_err();
    assert!(matches!(
        err,
        ZipError::OutOfRange {
            offset: 299_001,
            len: 1000,
            size: 300_000,
            ..
        }
    ));
    assert!(stored.read_exact_at(u64::MAX, &mut buf).is_err());
    // Through the RandomAccess view too.
    let view: &dyn RandomAccess = &stored;
    view.read_at(0, &mut buf[..4]).unwrap();
    assert_eq!(&buf[..4], &built.os_image[..4]);
    assert_eq!(
        archive.data_offset(os).unwrap(),
        stored.data_offset(),
        "data offset is stable"
    );
    assert_eq!(
        &built.bytes[stored.data_offset() as usize..][..16],
        &built.os_image[..16]
    );
    // Deflated entries have no random access.
    assert!(matches!(
        archive.stored(manifest),
        Err(ZipError::Unsupported { .. })
    ));
}

#[test]
fn reads_a_plain_archive() {
    check_contents(&build(false, ""));
}

#[test]
fn reads_zip64_extra_fields_from_another_writer() {
    let built = build(true, "");
    // The forced ZIP64 form must actually be in the file for this test to mean anything:
    // saturated sizes in the central directory, resolved through the 0x0001 extra field.
    let at = central_header(&built.bytes, 1);
    assert_eq!(&built.bytes[at + 20..at + 28], &[0xff; 8]);
    check_contents(&built);
}

#[test]
fn finds_the_end_record_behind_a_comment() {
    // A comment that itself contains an end-record signature must not mislead the search.
    let comment = format!("macrescue PK\u{5}\u{6} {}", "x".repeat(3000));
    check_contents(&build(false, &comment));
}

#[test]
fn reads_streamed_archives_with_data_descriptors() {
    let data = noise(70_000, 3);
    let mut writer = zip::ZipWriter::new_stream(Vec::new());
    let options = SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);
    writer.start_file("Restore.plist", options).unwrap();
    writer.write_all(&data).unwrap();
    writer
        .start_file(
            "stored.bin",
            options.compression_method(CompressionMethod::Stored),
        )
        .unwrap();
    writer.write_all(b"stored after a descriptor").unwrap();
    let bytes = writer.finish().unwrap().into_inner();
    let archive = ZipArchive::open(bytes).unwrap();
    assert_eq!(read_all(&archive, "Restore.plist"), data);
    assert_eq!(
        read_all(&archive, "stored.bin"),
        b"stored after a descriptor"
    );
}

#[test]
fn ipsw_helpers_find_the_build_manifest() {
    let built = build(false, "");
    let ipsw = Ipsw::open(built.bytes.clone()).unwrap();
    assert_eq!(ipsw.build_manifest().unwrap(), built.manifest);
    assert_eq!(
        ipsw.read_small("Firmware/dfu/iBSS.j274.RELEASE.im4p", 5_000)
            .unwrap(),
        built.ibss
    );
    let err = ipsw
        .read_small("Firmware/dfu/iBSS.j274.RELEASE.im4p", 4_999)
        .unwrap_err();
    assert!(matches!(
        err,
        ZipError::TooLarge {
            size: 5_000,
            limit: 4_999,
            ..
        }
    ));

    let err = ipsw.read_small("Restore.plist", 1 << 20).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the IPSW has no Restore.plist: it is not a complete macOS restore image; \
         check the file or download it again"
    );

    // An archive without a manifest is no IPSW.
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    writer
        .start_file("readme.txt", SimpleFileOptions::default())
        .unwrap();
    let other = Ipsw::open(writer.finish().unwrap().into_inner()).unwrap();
    assert!(matches!(
        other.build_manifest(),
        Err(ZipError::NoSuchEntry { name }) if name == BUILD_MANIFEST
    ));
}

#[test]
fn local_files_read_the_same() {
    let built = build(true, "");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("zip_archive_local.ipsw");
    std::fs::write(&path, &built.bytes).unwrap();
    let ipsw = Ipsw::open_path(&path).unwrap();
    assert_eq!(ipsw.build_manifest().unwrap(), built.manifest);
    assert_eq!(ipsw.archive().source().len(), built.bytes.len() as u64);
    assert_eq!(ipsw.archive().source().path(), path);
    std::fs::remove_file(&path).unwrap();

    let missing = Ipsw::open_path(path.with_extension("missing")).unwrap_err();
    assert!(matches!(
        missing,
        ZipError::Open { ref source, .. } if source.kind() == io::ErrorKind::NotFound
    ));
    assert!(
        missing.to_string().contains("zip_archive_local.missing"),
        "{missing}"
    );
}

/// Counts reads, to show that opening stays within a few bounded requests.
struct Counting {
    bytes: Vec<u8>,
    reads: RefCell<Vec<(u64, usize)>>,
}

impl RandomAccess for Counting {
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.reads.borrow_mut().push((offset, buf.len()));
        self.bytes.read_at(offset, buf)
    }
}

#[test]
fn opening_and_streaming_use_few_bounded_reads() {
    // Big enough that the central directory is not inside the tail read.
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let stored = SimpleFileOptions::default().compression_method(CompressionMethod::Stored);
    let big = noise(1 << 20, 4);
    writer.start_file("big.bin", stored).unwrap();
    writer.write_all(&big).unwrap();
    // ~130 KiB of central directory: more than the tail read.
    for i in 0..800 {
        writer
            .start_file(format!("Firmware/{i:0>100}"), stored)
            .unwrap();
    }
    let source = Counting {
        bytes: writer.finish().unwrap().into_inner(),
        reads: RefCell::default(),
    };
    let archive = ZipArchive::open(&source).unwrap();
    let opening = source.reads.borrow().clone();
    // Tail, then the central directory.
    assert_eq!(opening.len(), 2, "{opening:?}");
    assert_eq!(opening[0].1, 22 + 65_535 + 20);
    source.reads.borrow_mut().clear();

    let entry = archive.entry("big.bin").unwrap();
    let mut out = Vec::new();
    archive
        .reader(entry)
        .unwrap()
        .read_to_end(&mut out)
        .unwrap();
    assert_eq!(out, big);
    let reads = source.reads.borrow();
    // One local-header read, then chunks of at most READ_CHUNK.
    assert_eq!(reads[0], (0, 30));
    assert!(reads
        .iter()
        .all(|&(_, len)| len <= restore_agent::ipsw::zip::READ_CHUNK));
    assert!(reads.len() <= 1 + (1 << 20) / restore_agent::ipsw::zip::READ_CHUNK + 1);
}

#[test]
fn every_truncation_is_reported_as_truncated() {
    let built = build_small();
    let bytes = &built.bytes;
    // Every cut through the first headers and the end records, a sample through the rest.
    let cuts = (0..bytes.len()).filter(|&i| i < 100 || i >= bytes.len() - 1000 || i % 13 == 0);
    for cut in cuts {
        let err = ZipArchive::open(&bytes[..cut]).unwrap_err();
        assert!(matches!(err, ZipError::Truncated(_)), "cut at {cut}: {err}");
    }
    let err = ZipArchive::open(&bytes[..bytes.len() / 2]).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("the IPSW is truncated (download incomplete?)"),
        "{err}"
    );
}

#[test]
fn garbage_is_not_a_zip() {
    for garbage in [noise(100_000, 9), b"hello".to_vec(), vec![0u8; 70_000]] {
        let err = ZipArchive::open(garbage).unwrap_err();
        assert!(matches!(err, ZipError::NotZip(_)), "{err}");
        assert!(err.to_string().contains("not a ZIP archive"));
    }
}

#[test]
fn flipped_bytes_never_panic() {
    let built = build_small();
    let original = &built.bytes;
    // Every byte of the structures (headers, directory, end records), a sample of the data.
    let positions =
        (0..original.len()).filter(|&i| i < 300 || i >= original.len() - 1500 || i % 7 == 0);
    for i in positions {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut bytes = original.clone();
            bytes[i] ^= flip;
            let Ok(archive) = ZipArchive::open(&bytes[..]) else {
                continue;
            };
            for entry in archive.entries() {
                let _ = archive.read_to_vec(entry, 1 << 22);
                if let Ok(stored) = archive.stored(entry) {
                    let mut buf = [0u8; 64];
                    let _ = stored.read_exact_at(stored.len().saturating_sub(64), &mut buf);
                }
            }
        }
    }
}

#[test]
fn corrupted_data_fails_the_crc_check() {
    let built = build(false, "");
    let archive = ZipArchive::open(built.bytes.clone()).unwrap();
    let os = archive.entry("090-12345-678.dmg").unwrap();
    let start = archive.data_offset(os).unwrap() as usize;
    let manifest = archive.entry(BUILD_MANIFEST).unwrap();
    let manifest_start = archive.data_offset(manifest).unwrap() as usize;

    let mut bytes = built.bytes.clone();
    bytes[start + 1000] ^= 0x40;
    let archive = ZipArchive::open(bytes).unwrap();
    let err = archive
        .read_to_vec(archive.entry("090-12345-678.dmg").unwrap(), u64::MAX)
        .unwrap_err();
    assert!(matches!(
        err,
        ZipError::CrcMismatch { ref name, .. } if name == "090-12345-678.dmg"
    ));
    assert!(err.to_string().contains("download the IPSW again"));

    // Streaming reports the mismatch on the last byte even if the caller never reads past it.
    let entry = archive.entry("090-12345-678.dmg").unwrap();
    let mut reader = archive.reader(entry).unwrap();
    let mut out = vec![0u8; 300_000];
    let err = reader.read_exact(&mut out).unwrap_err();
    assert!(matches!(
        ZipError::from_io(err),
        ZipError::CrcMismatch { .. }
    ));

    // Damaged deflate data: a decode error or a CRC mismatch, never garbage accepted.
    let mut bytes = built.bytes.clone();
    for b in &mut bytes[manifest_start + 100..manifest_start + 140] {
        *b ^= 0x5a;
    }
    let archive = ZipArchive::open(bytes).unwrap();
    let err = archive
        .read_to_vec(archive.entry(BUILD_MANIFEST).unwrap(), u64::MAX)
        .unwrap_err();
    assert!(
        matches!(err, ZipError::Corrupt(_) | ZipError::CrcMismatch { .. }),
        "{err}"
    );
}

/// Offset of the central directory header of entry `index`, found by its signature.
fn central_header(bytes: &[u8], index: usize) -> usize {
    bytes
        .windows(4)
        .enumerate()
        .filter(|(_, w)| *w == [0x50, 0x4b, 0x01, 0x02])
        .nth(index)
        .unwrap()
        .0
}

#[test]
fn header_damage_gives_specific_errors() {
    let built = build(false, "");

    // Unknown compression method (e.g. LZMA = 14) in the central directory.
    let mut bytes = built.bytes.clone();
    let at = central_header(&bytes, 0);
    bytes[at + 10..at + 12].copy_from_slice(&14u16.to_le_bytes());
    let archive = ZipArchive::open(bytes).unwrap();
    let entry = archive.entry(BUILD_MANIFEST).unwrap();
    assert_eq!(entry.method, Method::Other(14));
    assert!(matches!(
        archive.reader(entry),
        Err(ZipError::Unsupported { .. })
    ));

    // Encrypted flag.
    let mut bytes = built.bytes.clone();
    let at = central_header(&bytes, 1);
    bytes[at + 8] |= 1;
    let archive = ZipArchive::open(bytes).unwrap();
    let entry = archive.entry("090-12345-678.dmg").unwrap();
    assert!(matches!(
        archive.stored(entry),
        Err(ZipError::Unsupported { .. })
    ));

    // A local header offset that points at no local header.
    let mut bytes = built.bytes.clone();
    let at = central_header(&bytes, 1);
    bytes[at + 42..at + 46].copy_from_slice(&5u32.to_le_bytes());
    let archive = ZipArchive::open(bytes).unwrap();
    let entry = archive.entry("090-12345-678.dmg").unwrap();
    assert!(matches!(
        archive.data_offset(entry),
        Err(ZipError::Corrupt(_))
    ));

    // A size reaching into the central directory.
    let mut bytes = built.bytes.clone();
    let at = central_header(&bytes, 1);
    bytes[at + 20..at + 24].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    bytes[at + 24..at + 28].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    let archive = ZipArchive::open(bytes).unwrap();
    let entry = archive.entry("090-12345-678.dmg").unwrap();
    assert!(matches!(archive.stored(entry), Err(ZipError::Corrupt(_))));

    // A size field saturated to 0xFFFFFFFF without a ZIP64 extra field.
    let mut bytes = built.bytes.clone();
    let at = central_header(&bytes, 1);
    bytes[at + 20..at + 24].copy_from_slice(&u32::MAX.to_le_bytes());
    let err = ZipArchive::open(bytes).unwrap_err();
    assert!(
        matches!(err, ZipError::Corrupt(ref m) if m.contains("ZIP64 extra field")),
        "{err}"
    );

    // An end record claiming more entries than the directory holds.
    let mut bytes = built.bytes.clone();
    let eocd = bytes.len() - 22;
    bytes[eocd + 10..eocd + 12].copy_from_slice(&6u16.to_le_bytes());
    assert!(matches!(ZipArchive::open(bytes), Err(ZipError::Corrupt(_))));

    // A multi-disk archive.
    let mut bytes = built.bytes.clone();
    let eocd = bytes.len() - 22;
    bytes[eocd + 4] = 1;
    assert!(matches!(ZipArchive::open(bytes), Err(ZipError::MultiDisk)));

    // A directory offset past the end records.
    let mut bytes = built.bytes.clone();
    let eocd = bytes.len() - 22;
    bytes[eocd + 16..eocd + 20].copy_from_slice(&u32::MAX.wrapping_sub(1).to_le_bytes());
    assert!(matches!(ZipArchive::open(bytes), Err(ZipError::Corrupt(_))));
}
