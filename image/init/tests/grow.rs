//! The data partition grows on a bigger medium, checked with other people's tools: a disk
//! image laid out like image/build.sh's (sfdisk GPT, our exFAT), files copied in through a
//! real exFAT implementation (Linux's driver or exfat-fuse on a loop device), the image
//! `truncate`d as if written to a bigger stick, grown by `macrescue-datapart grow` (the code
//! the init runs on first boot), then `sfdisk --verify`, `fsck.exfat -n`, the files' hashes,
//! `df` and a file over 4 GiB.
//!
//! Needs sfdisk and fsck.exfat (CI installs fdisk, exfatprogs, exfat-fuse); the mount half
//! needs root and loop devices. Each missing piece is skipped with a message saying which.

use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;
const ESP_START: u64 = 2048;
const DATA_START: u64 = ESP_START + 64 * 2048;
const DATA_SECTORS: u64 = 64 * 2048;

fn tool(name: &str) -> bool {
    Command::new("sh")
        .args([
            "-c",
            &format!("command -v {name} || test -x /usr/sbin/{name} || test -x /sbin/{name}"),
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn sbin(name: &str) -> Command {
    let path = ["/usr/sbin", "/sbin", "/usr/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name));
    Command::new(path)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn datapart() -> Command {
    Command::new(env!("CARGO_BIN_EXE_macrescue-datapart"))
}

/// A temp dir removed on drop (unmounting and detaching first).
struct Work {
    dir: PathBuf,
    mounts: Vec<PathBuf>,
    loops: Vec<String>,
}

impl Drop for Work {
    fn drop(&mut self) {
        for m in self.mounts.drain(..) {
            let _ = Command::new("umount").arg(&m).status();
        }
        for l in self.loops.drain(..) {
            let _ = Command::new("losetup").args(["-d", &l]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Work {
    /// Attach bytes [offset, offset+len) of `file` to a loop device and mount it at `at`.
    /// None when this host cannot mount exFAT (not root, no loop devices, no driver).
    fn mount(&mut self, file: &Path, offset: u64, len: u64, at: &Path) -> Option<()> {
        if !is_root() {
            eprintln!("SKIP mount checks: not root");
            return None;
        }
        std::fs::create_dir_all(at).ok()?;
        let out = Command::new("losetup")
            .args(["-f", "--show", "-o", &offset.to_string(), "--sizelimit"])
            .arg(len.to_string())
            .arg(file)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "SKIP mount checks: losetup: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        self.loops.push(dev.clone());
        let kernel = Command::new("mount")
            .args(["-t", "exfat", &dev])
            .arg(at)
            .output()
            .is_ok_and(|o| o.status.success());
        if !kernel {
            if !tool("mount.exfat-fuse") {
                eprintln!("SKIP mount checks: no exfat kernel driver and no exfat-fuse");
                return None;
            }
            let ok = sbin("mount.exfat-fuse")
                .arg(&dev)
                .arg(at)
                .output()
                .is_ok_and(|o| o.status.success());
            if !ok {
                eprintln!("SKIP mount checks: exfat-fuse could not mount {dev}");
                return None;
            }
        }
        self.mounts.push(at.to_path_buf());
        Some(())
    }

    fn unmount(&mut self) {
        for m in self.mounts.drain(..) {
            run(Command::new("umount").arg(&m));
        }
        for l in self.loops.drain(..) {
            run(Command::new("losetup").args(["-d", &l]));
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { nix::libc::geteuid() == 0 }
}

fn fsck_partition(disk: &Path, work: &Path, first: u64, sectors: u64) -> String {
    if is_root() {
        // A loop device over the partition: no copy of a multi-GiB image.
        let out = Command::new("losetup")
            .args([
                "-f",
                "--show",
                "-r",
                "-o",
                &(first * 512).to_string(),
                "--sizelimit",
            ])
            .arg((sectors * 512).to_string())
            .arg(disk)
            .output()
            .unwrap();
        if out.status.success() {
            let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
            let r = sbin("fsck.exfat").arg("-n").arg(&dev).output().unwrap();
            let _ = Command::new("losetup").args(["-d", &dev]).status();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&r.stdout),
                String::from_utf8_lossy(&r.stderr)
            );
            assert!(r.status.success(), "fsck.exfat -n failed:\n{text}");
            return text;
        }
    }
    // fsck.exfat reads a file: copy the partition out sparsely (holes stay holes).
    let part = work.join("part.img");
    run(Command::new("dd")
        .arg(format!("if={}", disk.display()))
        .arg(format!("of={}", part.display()))
        .args([
            "bs=1M",
            "conv=sparse",
            "status=none",
            "iflag=skip_bytes,count_bytes",
        ])
        .arg(format!("skip={}", first * 512))
        .arg(format!("count={}", sectors * 512)));
    let out = run(sbin("fsck.exfat").arg("-n").arg(&part));
    std::fs::remove_file(&part).unwrap();
    out
}

/// Hash of the partition tables and the data partition's boot regions: what a grow writes
/// besides the bitmap and FAT tail.
fn tables(disk: &Path) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(disk).unwrap();
    let len = f.metadata().unwrap().len();
    let mut head = vec![0u8; ((DATA_START + 24) * 512) as usize];
    f.read_exact_at(&mut head, 0).unwrap();
    let mut tail = vec![0u8; MIB as usize];
    f.read_exact_at(&mut tail, len - MIB).unwrap();
    head.extend(tail);
    head
}

fn sha256(path: &Path) -> String {
    run(Command::new("sha256sum").arg(path))[..64].to_string()
}

#[test]
fn a_stick_written_with_the_image_grows_keeping_its_files() {
    if !tool("sfdisk") || !tool("fsck.exfat") {
        eprintln!("SKIP: needs sfdisk (fdisk) and fsck.exfat (exfatprogs)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("macrescue-grow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut w = Work {
        dir: dir.clone(),
        mounts: vec![],
        loops: vec![],
    };
    // The data partition alone, formatted as build.sh does.
    let data = dir.join("data.img");
    run(Command::new("truncate").args(["-s", "64M"]).arg(&data));
    run(datapart()
        .args(["format"])
        .arg(&data)
        .args(["--serial", "4d524553"]));
    assert!(fsck_partition(&data, &dir, 0, DATA_SECTORS).contains("clean"));

    // A person copies files onto the small partition before first boot.
    let mnt = dir.join("mnt");
    let mut hashes = Vec::new();
    let mounted = w.mount(&data, 0, 64 * MIB, &mnt).is_some();
    if mounted {
        std::fs::create_dir_all(mnt.join("ipsw")).unwrap();
        let mut x = 0x1234_5678u32;
        let payload: Vec<u8> = (0..20 * MIB)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        std::fs::write(mnt.join("ipsw/Mac_Restore.ipsw"), &payload).unwrap();
        std::fs::write(mnt.join("notes.txt"), b"copied before first boot\n").unwrap();
        for f in ["ipsw/Mac_Restore.ipsw", "notes.txt"] {
            hashes.push((f, sha256(&mnt.join(f))));
        }
        w.unmount();
    }

    // The stick image: GPT like image/build.sh's (ESP, then MACRESCUE, 1 MiB slack).
    let disk = dir.join("disk.img");
    let total = DATA_START + DATA_SECTORS + 2048;
    run(Command::new("truncate")
        .args(["-s", &(total * 512).to_string()])
        .arg(&disk));
    let script = format!(
        "label: gpt\nfirst-lba: 2048\n\
         start={ESP_START}, size={}, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=\"ESP\"\n\
         start={DATA_START}, size={DATA_SECTORS}, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, name=\"MACRESCUE\"\n",
        64 * 2048
    );
    let mut child = sbin("sfdisk")
        .args(["-q", "--no-reread", "--no-tell-kernel"])
        .arg(&disk)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
    run(Command::new("dd")
        .arg(format!("if={}", data.display()))
        .arg(format!("of={}", disk.display()))
        .args(["bs=512", "conv=notrunc,sparse", "status=none"])
        .arg(format!("seek={DATA_START}")));
    std::fs::remove_file(&data).unwrap();

    // Unchanged size: nothing to do, nothing written.
    let before = sha256(&disk);
    run(datapart().arg("grow").arg(&disk));
    assert_eq!(
        sha256(&disk),
        before,
        "a same-size disk must not be touched"
    );

    // dd'd onto a 6 GiB stick.
    let big: u64 = 6 << 30;
    run(Command::new("truncate")
        .args(["-s", &big.to_string()])
        .arg(&disk));
    let out = run(datapart().arg("grow").arg(&disk));
    assert!(
        out.contains("MACRESCUE: data partition grown from 54.0 MiB to"),
        "{out}"
    );

    let verify = run(sbin("sfdisk").arg("--verify").arg(&disk));
    assert!(verify.contains("No errors detected"), "{verify}");
    let dump = run(sbin("sfdisk").arg("-d").arg(&disk));
    let last_lba = big / 512 - 34;
    let new_sectors = (last_lba + 1) / 2048 * 2048 - DATA_START;
    assert!(dump.contains(&format!("last-lba: {last_lba}")), "{dump}");
    assert!(
        dump.contains(&format!(
            "start=      {DATA_START}, size=    {new_sectors},"
        )),
        "{dump}"
    );
    let fsck = fsck_partition(&disk, &dir, DATA_START, new_sectors);
    assert!(fsck.contains("clean"), "{fsck}");

    // Growing again finds nothing to do.
    let again = tables(&disk);
    run(datapart().arg("grow").arg(&disk));
    assert!(tables(&disk) == again, "a second grow must write nothing");

    if !mounted
        || w.mount(&disk, DATA_START * 512, new_sectors * 512, &mnt)
            .is_none()
    {
        return;
    }
    for (f, h) in &hashes {
        assert_eq!(&sha256(&mnt.join(f)), h, "{f} changed");
    }
    let df = run(Command::new("df").args(["-B1M", "--output=size"]).arg(&mnt));
    let size: u64 = df.lines().nth(1).unwrap().trim().parse().unwrap();
    assert!(size > 6000, "df shows {size} MiB:\n{df}");
    // Files over 4 GiB (why the partition is exFAT, not FAT32). Cheap with Linux's driver
    // (valid data length: no zeros written); exfat-fuse writes 4 GiB of zeros, so there only
    // on request.
    let kernel_driver = std::fs::read_to_string("/proc/filesystems").is_ok_and(|t| {
        t.lines()
            .any(|l| l.trim_start_matches("nodev").trim() == "exfat")
    });
    if !kernel_driver && std::env::var_os("MACRESCUE_GROW_LARGE_FILE").is_none() {
        eprintln!("SKIP the > 4 GiB file: no exfat kernel driver (MACRESCUE_GROW_LARGE_FILE=1 writes it through exfat-fuse)");
        return;
    }
    let large = mnt.join("ipsw/large.ipsw");
    let f = std::fs::File::create(&large).unwrap();
    f.set_len(4 * 1024 * MIB + 4096).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"tail", 4 * 1024 * MIB).unwrap();
    drop(f);
    w.unmount();
    let fsck = fsck_partition(&disk, &dir, DATA_START, new_sectors);
    assert!(fsck.contains("clean") && fsck.contains("files 3"), "{fsck}");
    w.mount(&disk, DATA_START * 512, new_sectors * 512, &mnt)
        .unwrap();
    let mut tail = [0u8; 4];
    std::fs::File::open(&large)
        .unwrap()
        .read_exact_at(&mut tail, 4 * 1024 * MIB)
        .unwrap();
    assert_eq!(&tail, b"tail");
    assert_eq!(
        std::fs::metadata(&large).unwrap().len(),
        4 * 1024 * MIB + 4096
    );
}
