//! `make-ipsw` output read back with an independent ZIP reader (the `zip` crate).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

use mac_sim::images::{fourcc_for, RESTORE_REWRITES};
use mac_sim::img4::{FourCc, Im4m, Im4p};
use mac_sim::ipsw::{make_ipsw, os_byte, os_fill, with_fourcc, IpswOptions, SPARSE_PERIOD};
use plist::{Dictionary, Value};
use sha2::{Digest, Sha384};
use zip::CompressionMethod;

/// A temporary output path removed when dropped, so a failing test (or a full disk) does not
/// leave multi-GiB sparse IPSWs behind.
struct TempPath(PathBuf);

impl std::ops::Deref for TempPath {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl AsRef<std::path::Path> for TempPath {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn temp(name: &str) -> TempPath {
    TempPath(std::env::temp_dir().join(format!("mac-sim-{}-{name}", std::process::id())))
}

fn read_entry(z: &mut zip::ZipArchive<File>, name: &str) -> Vec<u8> {
    let mut f = z.by_name(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut v = Vec::new();
    f.read_to_end(&mut v).unwrap();
    v
}

fn os_expected(len: u64, sparse: bool) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    if os_fill(0, &mut v, sparse) {
        v.fill(0);
    }
    v
}

/// Every component path, manifest digest and 4CC agrees with the IM4P files.
fn check_components(z: &mut zip::ZipArchive<File>, manifest: &Dictionary, os_paths: &[String]) {
    let mut checked = 0;
    for id in manifest["BuildIdentities"].as_array().unwrap() {
        let id = id.as_dictionary().unwrap();
        for (name, e) in id["Manifest"].as_dictionary().unwrap() {
            let e = e.as_dictionary().unwrap();
            let Some(info) = e.get("Info").and_then(Value::as_dictionary) else {
                continue;
            };
            let Some(path) = info.get("Path").and_then(Value::as_string) else {
                continue;
            };
            if os_paths.iter().any(|p| p == path) {
                continue;
            }
            let file = read_entry(z, path);
            let p = Im4p::parse(&file).unwrap();
            let rewrite = RESTORE_REWRITES.iter().find(|(n, _)| n == name);
            let delivered = match rewrite {
                Some((_, cc)) => with_fourcc(&file, FourCc::parse(cc).unwrap()),
                None => {
                    let want =
                        fourcc_for(name, info.get("Img4PayloadType").and_then(Value::as_string));
                    assert_eq!(p.fourcc, want, "{name} at {path}");
                    file.clone()
                }
            };
            if let Some(d) = e.get("Digest").and_then(Value::as_data) {
                assert_eq!(d, &Sha384::digest(&delivered)[..], "{name}");
                checked += 1;
            }
        }
    }
    assert!(checked > 30, "only {checked} digests checked");
}

#[test]
fn small_ipsw_has_the_real_layout_and_consistent_digests() {
    let out = temp("small.ipsw");
    let mut opts = IpswOptions::new("J274AP");
    opts.os_size = 3 * 65536 + 17;
    let s = make_ipsw(&opts, &out).unwrap();
    let mut z = zip::ZipArchive::new(File::open(&out).unwrap()).unwrap();
    let names: Vec<String> = z.file_names().map(str::to_string).collect();
    assert_eq!(
        &names[..4],
        [
            "BuildManifest.plist",
            "Restore.plist",
            "RestoreVersion.plist",
            "SystemVersion.plist"
        ]
    );
    assert_eq!(names.len(), s.entries.len());
    // The OS image: stored, at the manifest's path, generated content.
    assert_eq!(s.os_paths, ["../Restore/043-90104-068.dmg.aea"]);
    {
        let f = z.by_name(&s.os_paths[0]).unwrap();
        assert_eq!(f.compression(), CompressionMethod::Stored);
        assert_eq!(f.size(), opts.os_size);
    }
    assert_eq!(
        read_entry(&mut z, &s.os_paths[0]),
        os_expected(opts.os_size, false)
    );
    // The whole fixture manifest, digests rewritten.
    let bm = Value::from_reader_xml(&read_entry(&mut z, "BuildManifest.plist")[..]).unwrap();
    let bm = bm.into_dictionary().unwrap();
    assert_eq!(bm, s.manifest);
    assert_eq!(bm["ProductBuildVersion"].as_string(), Some("25C56"));
    let fixture =
        Value::from_file(mac_sim::board::manifests_dir().join("J274AP.BuildManifest.plist"))
            .unwrap()
            .into_dictionary()
            .unwrap();
    assert_eq!(
        bm.keys().collect::<Vec<_>>(),
        fixture.keys().collect::<Vec<_>>()
    );
    let ibss_digest = |m: &Dictionary| {
        m["BuildIdentities"].as_array().unwrap()[1]
            .as_dictionary()
            .unwrap()["Manifest"]
            .as_dictionary()
            .unwrap()["iBSS"]
            .as_dictionary()
            .unwrap()["Digest"]
            .clone()
    };
    assert_ne!(ibss_digest(&bm), ibss_digest(&fixture));
    check_components(&mut z, &bm, &s.os_paths);
    // KernelCache and RestoreKernelCache share one file stored as krnl.
    let kc = read_entry(&mut z, "kernelcache.release.mac13g");
    assert_eq!(Im4p::parse(&kc).unwrap().fourcc, FourCc(*b"krnl"));
    // The plists.
    let rv = Value::from_reader_xml(&read_entry(&mut z, "RestoreVersion.plist")[..]).unwrap();
    assert_eq!(
        rv.as_dictionary().unwrap()["ProductBuildVersion"].as_string(),
        Some("25C56")
    );
    let rp = Value::from_reader_xml(&read_entry(&mut z, "Restore.plist")[..]).unwrap();
    let map = rp.as_dictionary().unwrap()["DeviceMap"].as_array().unwrap();
    assert_eq!(
        map[0].as_dictionary().unwrap()["BoardConfig"].as_string(),
        Some("j274ap")
    );
    // The global manifest is a ticket signed by the test key for this board.
    let gm = read_entry(
        &mut z,
        "Firmware/Manifests/restore/Customer Software Update/apticket.j274ap.im4m",
    );
    let m = Im4m::parse(&gm).unwrap();
    assert_eq!(m.manp_uint("CHIP"), Some(0x8103));
    assert!(mac_sim::ticket::verify_signature(
        m.signed_set,
        m.signature.unwrap()
    ));
}

#[test]
fn deflated_os_image_reads_back() {
    let out = temp("deflate.ipsw");
    let mut opts = IpswOptions::new("j414sap");
    opts.os_size = 300_001;
    opts.deflate_os = true;
    let s = make_ipsw(&opts, &out).unwrap();
    let mut z = zip::ZipArchive::new(File::open(&out).unwrap()).unwrap();
    {
        let f = z.by_name(&s.os_paths[0]).unwrap();
        assert_eq!(f.compression(), CompressionMethod::Deflated);
        assert_eq!(f.size(), 300_001);
    }
    assert_eq!(
        read_entry(&mut z, &s.os_paths[0]),
        os_expected(300_001, false)
    );
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().unwrap())
}

#[test]
fn forced_zip64_records_on_a_small_file() {
    let out = temp("zip64.ipsw");
    let mut opts = IpswOptions::new("j274ap");
    opts.os_size = 100_000;
    opts.force_zip64 = true;
    let s = make_ipsw(&opts, &out).unwrap();
    let raw = std::fs::read(&out).unwrap();
    // EOCD at the very end with ZIP64 markers, locator right before it, EOCD64 before that.
    let eocd = raw.len() - 22;
    assert_eq!(u32_at(&raw, eocd), 0x0605_4b50);
    assert_eq!(
        u32_at(&raw, eocd + 12),
        0xFFFF_FFFF,
        "cd size deferred to ZIP64"
    );
    assert_eq!(
        u32_at(&raw, eocd + 16),
        0xFFFF_FFFF,
        "cd offset deferred to ZIP64"
    );
    let loc = eocd - 20;
    assert_eq!(u32_at(&raw, loc), 0x0706_4b50);
    let eocd64 = u64::from_le_bytes(raw[loc + 8..loc + 16].try_into().unwrap()) as usize;
    assert_eq!(u32_at(&raw, eocd64), 0x0606_4b50);
    let count = u64::from_le_bytes(raw[eocd64 + 32..eocd64 + 40].try_into().unwrap());
    assert_eq!(count as usize, s.entries.len());
    // The first local header carries the ZIP64 extra with the real sizes.
    assert_eq!(u32_at(&raw, 0), 0x0403_4b50);
    assert_eq!(u32_at(&raw, 18), 0xFFFF_FFFF);
    let name_len = u16::from_le_bytes([raw[26], raw[27]]) as usize;
    assert_eq!(
        u16::from_le_bytes([raw[30 + name_len], raw[31 + name_len]]),
        1
    );
    // And an independent reader understands all of it.
    let mut z = zip::ZipArchive::new(File::open(&out).unwrap()).unwrap();
    assert_eq!(z.len(), s.entries.len());
    for (name, size) in &s.entries {
        assert_eq!(z.by_name(name).unwrap().size(), *size, "{name}");
    }
    assert_eq!(
        read_entry(&mut z, &s.os_paths[0]),
        os_expected(100_000, false)
    );
    check_components(&mut z, &s.manifest, &s.os_paths);
}

/// A > 4 GiB OS image: sparse on disk (a few MiB), headers and offsets checked, content
/// spot-checked at a few offsets including beyond 4 GiB.
#[test]
fn os_image_over_4_gib_uses_zip64() {
    let out = temp("big.ipsw");
    let mut opts = IpswOptions::new("j274ap");
    opts.os_size = (4 << 30) + 3 * SPARSE_PERIOD + 12345;
    opts.sparse_os = true;
    let s = make_ipsw(&opts, &out).unwrap();
    let meta = std::fs::metadata(&out).unwrap();
    assert!(meta.len() > opts.os_size);
    let file = File::open(&out).unwrap();
    let mut z = zip::ZipArchive::new(file).unwrap();
    let (data_start, crc) = {
        let f = z.by_name(&s.os_paths[0]).unwrap();
        assert_eq!(f.size(), opts.os_size);
        assert_eq!(f.compressed_size(), opts.os_size);
        (f.data_start(), f.crc32())
    };
    // Entries after the OS image sit beyond 4 GiB: their offsets came from ZIP64 extras.
    let kc = read_entry(&mut z, "kernelcache.release.mac13g");
    assert_eq!(Im4p::parse(&kc).unwrap().fourcc, FourCc(*b"krnl"));
    assert!(
        z.by_name("kernelcache.release.mac13g")
            .unwrap()
            .header_start()
            > 1 << 32
    );
    check_components(&mut z, &s.manifest, &s.os_paths);
    // Spot-check the OS bytes, including beyond 4 GiB.
    let mut f = File::open(&out).unwrap();
    for off in [
        0u64,
        4095,
        4096,
        SPARSE_PERIOD,
        SPARSE_PERIOD + 100,
        (4 << 30) + SPARSE_PERIOD - 1,
        (4 << 30) + 3 * SPARSE_PERIOD,
        opts.os_size - 1,
    ] {
        f.seek(SeekFrom::Start(data_start + off)).unwrap();
        let mut b = [0u8];
        f.read_exact(&mut b).unwrap();
        assert_eq!(b[0], os_byte(off, true), "offset {off}");
    }
    // The CRC of the sparse image, computed from its structure: every period is a dense head
    // then zeros (the CRC of a full zero run is computed once and combined, crc32fast's own
    // combination, to keep the test fast).
    let zero_run = |len: u64| {
        let mut h = crc32fast::Hasher::new();
        let zeros = vec![0u8; 1 << 20];
        let mut left = len;
        while left > 0 {
            let k = left.min(zeros.len() as u64) as usize;
            h.update(&zeros[..k]);
            left -= k as u64;
        }
        h
    };
    let full_run = zero_run(SPARSE_PERIOD - 4096);
    let mut h = crc32fast::Hasher::new();
    let mut head = vec![0u8; 4096];
    let mut off = 0u64;
    while off < opts.os_size {
        let n = (opts.os_size - off).min(4096);
        os_fill(off, &mut head[..n as usize], true);
        h.update(&head[..n as usize]);
        off += n;
        let z = (opts.os_size - off).min(SPARSE_PERIOD - 4096);
        if z == SPARSE_PERIOD - 4096 {
            h.combine(&full_run);
        } else {
            h.combine(&zero_run(z));
        }
        off += z;
    }
    assert_eq!(h.finalize(), crc);
}
