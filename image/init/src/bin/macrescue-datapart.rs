//! macrescue-datapart: format the image's data partition with the layout that can grow
//! (image/build.sh), and grow a disk image or stick the way the init does on first boot.
//!
//! usage: macrescue-datapart format FILE [--label L] [--serial HEX] [--max-gib N]
//!        macrescue-datapart grow DISK [--label L]

use anyhow::{bail, Context};
use macrescue_init::exfat::{self, FormatOptions};
use macrescue_init::growpart;

const USAGE: &str = "usage: macrescue-datapart format FILE [--label L] [--serial HEX] [--max-gib N]\n       macrescue-datapart grow DISK [--label L]";

fn main() {
    if let Err(e) = run(std::env::args().skip(1).collect()) {
        eprintln!("macrescue-datapart: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Vec<String>) -> anyhow::Result<()> {
    let (Some(cmd), Some(path)) = (args.first(), args.get(1)) else {
        bail!("{USAGE}");
    };
    let mut o = FormatOptions::default();
    let mut rest = args[2..].iter();
    while let Some(k) = rest.next() {
        let v = rest
            .next()
            .with_context(|| format!("{k} needs a value\n{USAGE}"))?;
        match k.as_str() {
            "--label" => o.label = v.clone(),
            "--serial" => {
                o.serial = u32::from_str_radix(v, 16).context("--serial takes 8 hex digits")?
            }
            "--max-gib" => o.max_bytes = v.parse::<u64>().context("--max-gib")? << 30,
            _ => bail!("unknown option {k}\n{USAGE}"),
        }
    }
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {path}"))?;
    let len = disk_len(&mut f).with_context(|| format!("cannot size {path}"))?;
    match cmd.as_str() {
        "format" => {
            let g = exfat::format(&mut f, 0, len, &o)?;
            f.sync_all()?;
            eprintln!(
                "{path}: exFAT {:?}, {} clusters of {} KiB, FAT reserved for {} GiB",
                o.label,
                g.new_clusters,
                g.cluster_bytes >> 10,
                o.max_bytes >> 30
            );
        }
        "grow" => {
            let sector = 512;
            let table = growpart::grow_table(&mut f, len, sector, &o.label, None)?;
            let Some((first, last)) = table
                .as_ref()
                .map(|g| (g.first_lba, g.new_last_lba))
                .or_else(|| find_partition(&mut f, &o.label))
            else {
                bail!("{path}: no GPT partition named {}", o.label);
            };
            if let Some(g) = &table {
                eprintln!(
                    "{path}: partition {} now ends at sector {} (was {})",
                    g.number, g.new_last_lba, g.old_last_lba
                );
            }
            let part_bytes = (last - first + 1) * sector;
            let grown = growpart::grow_fs(&mut f, first * sector, part_bytes)?;
            f.sync_all()?;
            if grown.changed() {
                eprintln!("{path}: {}", growpart::describe(&grown, part_bytes));
            } else {
                eprintln!("{path}: the file system already fills what it can");
            }
        }
        _ => bail!("{USAGE}"),
    }
    Ok(())
}

/// Length of a file or block device.
fn disk_len(f: &mut std::fs::File) -> std::io::Result<u64> {
    use std::io::Seek;
    f.seek(std::io::SeekFrom::End(0))
}

/// (first, last) LBA of the GPT partition named `label`, from the primary table as it is now.
fn find_partition(f: &mut std::fs::File, label: &str) -> Option<(u64, u64)> {
    use macrescue_init::exfat::Disk;
    let mut lba1 = vec![0u8; 512];
    f.read_at(512, &mut lba1).ok()?;
    let h = macrescue_init::gpt::Header::parse(&lba1).ok()?;
    let mut entries = vec![0u8; h.entries_bytes() as usize];
    f.read_at(h.entries_lba * 512, &mut entries).ok()?;
    macrescue_init::gpt::find(&entries, h.entry_size as usize, label)
}
