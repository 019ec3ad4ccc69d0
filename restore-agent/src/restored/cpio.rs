//! cpio "odc" archives, the format of the BootabilityBundle stream (protocol.md §7.7.1).

/// Mode of a regular file with permissions 0644.
pub const MODE_FILE: u32 = 0o100_644;

/// Appends one entry: 76-byte ASCII header, name + NUL, data.
pub fn push_entry(out: &mut Vec<u8>, ino: u32, mode: u32, nlink: u32, name: &str, data: &[u8]) {
    let header = format!(
        "070707{:06o}{:06o}{:06o}{:06o}{:06o}{:06o}{:06o}{:011o}{:06o}{:011o}",
        0u32,
        ino & 0o777_777,
        mode & 0o777_777,
        0u32,
        0u32,
        nlink & 0o777_777,
        0u32,
        0u64,
        (name.len() + 1) & 0o777_777,
        (data.len() as u64) & 0o77_777_777_777,
    );
    debug_assert_eq!(header.len(), 76);
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    out.extend_from_slice(data);
}

/// Appends the `TRAILER!!!` entry that ends an archive.
pub fn push_trailer(out: &mut Vec<u8>) {
    push_entry(out, 0, 0, 1, "TRAILER!!!", &[]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odc_layout() {
        let mut out = Vec::new();
        push_entry(&mut out, 1, MODE_FILE, 1, "a/b", b"xyz");
        push_trailer(&mut out);
        let first = &out[..76];
        assert_eq!(
            first,
            [
                "070707",
                "000000",
                "000001",
                "100644",
                "000000",
                "000000",
                "000001",
                "000000",
                "00000000000",
                "000004",
                "00000000003",
            ]
            .concat()
            .as_bytes()
        );
        assert_eq!(&out[76..80], b"a/b\0");
        assert_eq!(&out[80..83], b"xyz");
        assert_eq!(&out[83 + 59..83 + 65], b"000013");
        assert!(out.ends_with(b"TRAILER!!!\0"));
        assert_eq!(out.len(), 83 + 76 + 11);
    }
}
