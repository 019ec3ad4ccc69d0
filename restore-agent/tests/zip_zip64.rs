//! ZIP64 beyond 4 GiB, as in a real IPSW whose OS image is larger than 4 GiB (protocol.md
//! §9.7). The archive is a sparse file with hand-written headers, so it costs a few KiB of disk
//! and no time to write.

#![cfg(unix)]

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use restore_agent::ipsw::{Ipsw, Method, RandomAccess, ZipError, BUILD_MANIFEST};

const FOUR_GIB: u64 = 1 << 32;
/// Larger than any 32-bit size field can hold.
const OS_IMAGE_LEN: u64 = FOUR_GIB + 65_536 + 3;
const OS_IMAGE_NAME: &str = "090-00000-000.dmg";

fn deflate(data: &[u8]) -> Vec<u8> {
    let mut encoder =
        flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

fn local_header(name: &str, method: u16, crc: u32, sizes: (u32, u32), extra: &[u8]) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
    h.extend_from_slice(&45u16.to_le_bytes()); // version needed: ZIP64
    h.extend_from_slice(&0u16.to_le_bytes()); // flags
    h.extend_from_slice(&method.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes()); // time, date
    h.extend_from_slice(&crc.to_le_bytes());
    h.extend_from_slice(&sizes.0.to_le_bytes()); // compressed
    h.extend_from_slice(&sizes.1.to_le_bytes()); // uncompressed
    h.extend_from_slice(&(name.len() as u16).to_le_bytes());
    h.extend_from_slice(&(extra.len() as u16).to_le_bytes());
    h.extend_from_slice(name.as_bytes());
    h.extend_from_slice(extra);
    h
}

struct Central<'a> {
    name: &'a str,
    method: u16,
    crc: u32,
    compressed: u64,
    uncompressed: u64,
    offset: u64,
}

/// A central header, moving each value that does not fit 32 bits into a ZIP64 extra field.
fn central_header(e: &Central<'_>) -> Vec<u8> {
    let mut zip64 = Vec::new();
    let mut field32 = |value: u64| -> u32 {
        if value >= u64::from(u32::MAX) {
            zip64.extend_from_slice(&value.to_le_bytes());
            u32::MAX
        } else {
            value as u32
        }
    };
    let uncompressed = field32(e.uncompressed);
    let compressed = field32(e.compressed);
    let offset = field32(e.offset);
    let mut extra = Vec::new();
    // An unrelated extra field first: the reader must skip it to find 0x0001.
    extra.extend_from_slice(&0x5455u16.to_le_bytes());
    extra.extend_from_slice(&5u16.to_le_bytes());
    extra.extend_from_slice(&[1, 0, 0, 0, 0]);
    if !zip64.is_empty() {
        extra.extend_from_slice(&1u16.to_le_bytes());
        extra.extend_from_slice(&(zip64.len() as u16).to_le_bytes());
        extra.extend_from_slice(&zip64);
    }

    let mut h = Vec::new();
    h.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
    h.extend_from_slice(&0x031eu16.to_le_bytes()); // made by: Unix, 3.0
    h.extend_from_slice(&45u16.to_le_bytes());
    h.extend_from_slice(&0x0800u16.to_le_bytes()); // UTF-8 names
    h.extend_from_slice(&e.method.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&e.crc.to_le_bytes());
    h.extend_from_slice(&compressed.to_le_bytes());
    h.extend_from_slice(&uncompressed.to_le_bytes());
    h.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
    h.extend_from_slice(&(extra.len() as u16).to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes()); // comment
    h.extend_from_slice(&0u16.to_le_bytes()); // disk
    h.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
    h.extend_from_slice(&0u32.to_le_bytes()); // external attributes
    h.extend_from_slice(&offset.to_le_bytes());
    h.extend_from_slice(e.name.as_bytes());
    h.extend_from_slice(&extra);
    h
}

fn end_records(entries: u64, cd_offset: u64, cd_len: u64, comment: &[u8]) -> Vec<u8> {
    let zip64_offset = cd_offset + cd_len;
    let mut r = Vec::new();
    r.extend_from_slice(&0x0606_4b50u32.to_le_bytes());
    r.extend_from_slice(&44u64.to_le_bytes()); // size of the rest of this record
    r.extend_from_slice(&45u16.to_le_bytes());
    r.extend_from_slice(&45u16.to_le_bytes());
    r.extend_from_slice(&0u32.to_le_bytes());
    r.extend_from_slice(&0u32.to_le_bytes());
    r.extend_from_slice(&entries.to_le_bytes());
    r.extend_from_slice(&entries.to_le_bytes());
    r.extend_from_slice(&cd_len.to_le_bytes());
    r.extend_from_slice(&cd_offset.to_le_bytes());
    // Locator.
    r.extend_from_slice(&0x0706_4b50u32.to_le_bytes());
    r.extend_from_slice(&0u32.to_le_bytes());
    r.extend_from_slice(&zip64_offset.to_le_bytes());
    r.extend_from_slice(&1u32.to_le_bytes());
    // Classic end record, saturated where ZIP64 takes over.
    r.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    r.extend_from_slice(&0u16.to_le_bytes());
    r.extend_from_slice(&0u16.to_le_bytes());
    r.extend_from_slice(&(entries as u16).to_le_bytes());
    r.extend_from_slice(&(entries as u16).to_le_bytes());
    r.extend_from_slice(&(cd_len as u32).to_le_bytes());
    r.extend_from_slice(&u32::MAX.to_le_bytes());
    r.extend_from_slice(&(comment.len() as u16).to_le_bytes());
    r.extend_from_slice(comment);
    r
}

/// Markers written into the otherwise-sparse OS image: (offset within the entry, bytes).
fn markers() -> Vec<(u64, &'static [u8])> {
    vec![
        (0, b"ASR image start"),
        (FOUR_GIB - 7, b"across the 4 GiB line"),
        (OS_IMAGE_LEN - 9, b"last bytes"[1..].as_ref()),
    ]
}

struct Fixture {
    path: PathBuf,
    manifest: Vec<u8>,
    restore_plist: Vec<u8>,
    os_data_offset: u64,
    manifest_header_offset: u64,
    len: u64,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn write_fixture(name: &str, comment: &[u8]) -> Fixture {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap();

    let restore_plist =
        b"<plist><dict><key>ProductType</key><string>Mac14,2</string></dict></plist>".to_vec();
    let manifest = format!("<plist>{}</plist>", "<key>Manifest</key>".repeat(500)).into_bytes();
    let restore_deflated = deflate(&restore_plist);
    let manifest_deflated = deflate(&manifest);

    let mut offset = 0u64;
    let mut central = Vec::new();

    // Entry 1: small, deflated, before the large one.
    let header = local_header(
        "Restore.plist",
        8,
        crc32fast::hash(&restore_plist),
        (restore_deflated.len() as u32, restore_plist.len() as u32),
        &[],
    );
    file.write_all_at(&header, offset).unwrap();
    file.write_all_at(&restore_deflated, offset + header.len() as u64)
        .unwrap();
    central.push(central_header(&Central {
        name: "Restore.plist",
        method: 8,
        crc: crc32fast::hash(&restore_plist),
        compressed: restore_deflated.len() as u64,
        uncompressed: restore_plist.len() as u64,
        offset,
    }));
    offset += (header.len() + restore_deflated.len()) as u64;

    // Entry 2: the > 4 GiB stored OS image; its local header carries ZIP64 sizes too.
    let mut local_extra = Vec::new();
    local_extra.extend_from_slice(&1u16.to_le_bytes());
    local_extra.extend_from_slice(&16u16.to_le_bytes());
    local_extra.extend_from_slice(&OS_IMAGE_LEN.to_le_bytes());
    local_extra.extend_from_slice(&OS_IMAGE_LEN.to_le_bytes());
    let header = local_header(OS_IMAGE_NAME, 0, 0, (u32::MAX, u32::MAX), &local_extra);
    file.write_all_at(&header, offset).unwrap();
    let os_data_offset = offset + header.len() as u64;
    for (at, bytes) in markers() {
        file.write_all_at(bytes, os_data_offset + at).unwrap();
    }
    central.push(central_header(&Central {
        name: OS_IMAGE_NAME,
        method: 0,
        crc: 0,
        compressed: OS_IMAGE_LEN,
        uncompressed: OS_IMAGE_LEN,
        offset,
    }));
    offset = os_data_offset + OS_IMAGE_LEN;

    // Entry 3: the manifest, whose header lies beyond 4 GiB (offset via ZIP64 extra).
    let manifest_header_offset = offset;
    let header = local_header(
        BUILD_MANIFEST,
        8,
        crc32fast::hash(&manifest),
        (manifest_deflated.len() as u32, manifest.len() as u32),
        &[],
    );
    file.write_all_at(&header, offset).unwrap();
    file.write_all_at(&manifest_deflated, offset + header.len() as u64)
        .unwrap();
    central.push(central_header(&Central {
        name: BUILD_MANIFEST,
        method: 8,
        crc: crc32fast::hash(&manifest),
        compressed: manifest_deflated.len() as u64,
        uncompressed: manifest.len() as u64,
        offset,
    }));
    offset += (header.len() + manifest_deflated.len()) as u64;

    let cd: Vec<u8> = central.concat();
    file.write_all_at(&cd, offset).unwrap();
    let end = end_records(3, offset, cd.len() as u64, comment);
    file.write_all_at(&end, offset + cd.len() as u64).unwrap();
    let len = offset + (cd.len() + end.len()) as u64;
    file.sync_all().unwrap();
    assert_eq!(file.metadata().unwrap().len(), len);

    Fixture {
        path,
        manifest,
        restore_plist,
        os_data_offset,
        manifest_header_offset,
        len,
    }
}

#[test]
fn entries_beyond_four_gib() {
    let fixture = write_fixture("zip64_beyond_4gib.ipsw", b"");
    assert!(fixture.manifest_header_offset > FOUR_GIB);

    let ipsw = Ipsw::open_path(&fixture.path).unwrap();
    let archive = ipsw.archive();
    assert_eq!(archive.source().len(), fixture.len);
    assert_eq!(archive.entries().len(), 3);

    let os = archive.entry(OS_IMAGE_NAME).unwrap();
    assert_eq!(os.method, Method::Stored);
    assert_eq!(os.compressed_size, OS_IMAGE_LEN);
    assert_eq!(os.uncompressed_size, OS_IMAGE_LEN);
    assert_eq!(
        os.local_header_offset,
        fixture.os_data_offset - 30 - OS_IMAGE_NAME.len() as u64 - 20
    );

    let manifest = archive.entry(BUILD_MANIFEST).unwrap();
    assert_eq!(manifest.local_header_offset, fixture.manifest_header_offset);
    assert_eq!(ipsw.build_manifest().unwrap(), fixture.manifest);
    assert_eq!(
        ipsw.read_small("Restore.plist", 1 << 20).unwrap(),
        fixture.restore_plist
    );

    // Random access across the whole > 4 GiB entry.
    let stored = archive.stored(os).unwrap();
    assert_eq!(stored.data_offset(), fixture.os_data_offset);
    assert_eq!(stored.len(), OS_IMAGE_LEN);
    for (at, bytes) in markers() {
        let mut buf = vec![0u8; bytes.len()];
        stored.read_exact_at(at, &mut buf).unwrap();
        assert_eq!(buf, bytes, "marker at {at}");
    }
    let mut hole = [0xaau8; 32];
    stored.read_exact_at(FOUR_GIB + 100, &mut hole).unwrap();
    assert_eq!(hole, [0u8; 32]);
    let mut past = [0u8; 10];
    assert!(matches!(
        stored.read_exact_at(OS_IMAGE_LEN - 9, &mut past),
        Err(ZipError::OutOfRange { .. })
    ));

    // Streaming a stored entry reads it in order from its data start.
    let mut reader = archive.reader(os).unwrap();
    let mut head = [0u8; 15];
    reader.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"ASR image start");
    assert_eq!(reader.position(), 15);
}

#[test]
fn a_cut_off_large_ipsw_is_truncated() {
    let fixture = write_fixture("zip64_truncated.ipsw", b"");
    // As if the download stopped inside the OS image.
    let file = OpenOptions::new().write(true).open(&fixture.path).unwrap();
    file.set_len(fixture.os_data_offset + FOUR_GIB).unwrap();
    drop(file);
    let err = Ipsw::open_path(&fixture.path).unwrap_err();
    assert!(matches!(err, ZipError::Truncated(_)), "{err}");
    assert!(err
        .to_string()
        .starts_with("the IPSW is truncated (download incomplete?)"));

    // Preallocated but never filled in (the tail is all zeros): still truncated, not garbage.
    let file = File::options().write(true).open(&fixture.path).unwrap();
    file.set_len(fixture.len).unwrap();
    drop(file);
    assert!(matches!(
        Ipsw::open_path(&fixture.path),
        Err(ZipError::Truncated(_))
    ));
}

#[test]
fn zip64_record_outside_the_tail_read() {
    // A maximal comment pushes the ZIP64 record out of the tail the reader fetches first, so
    // it needs its own read.
    let fixture = write_fixture("zip64_long_comment.ipsw", &[b'c'; 65_535]);
    let ipsw = Ipsw::open_path(&fixture.path).unwrap();
    assert_eq!(ipsw.archive().entries().len(), 3);
    assert_eq!(ipsw.build_manifest().unwrap(), fixture.manifest);
}
