#!/usr/bin/env python3
"""Regenerates the seeds of the format fuzz targets (zip_central_directory, catalog, manifest,
tss_response, img4, usbmux, restored_framing, asr_commands) from the shared fixtures. Run from anywhere:

    python3 fuzz/seeds/make_seeds.py [path/to/shared]

The committed seeds are its output; they are small on purpose (libFuzzer and the smoke test
mutate them thousands of times). Only the standard library is used.
"""

import base64
import io
import os
import plistlib
import struct
import sys
import zipfile
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "..", "..", "shared")
FIX = os.path.join(SHARED, "fixtures")


def write(target, name, data):
    os.makedirs(os.path.join(HERE, target), exist_ok=True)
    with open(os.path.join(HERE, target, name), "wb") as f:
        f.write(data)


# ----- zip_central_directory ---------------------------------------------------------------

MANIFEST_SNIPPET = b'<?xml version="1.0"?><plist version="1.0"><dict><key>ProductVersion</key>' \
    b'<string>26.2</string></dict></plist>\n' * 3


def fixed_zip(entries, comment=b""):
    """A ZIP with fixed timestamps, so regenerating gives the same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data, method in entries:
            info = zipfile.ZipInfo(name, date_time=(2025, 12, 21, 0, 0, 0))
            info.compress_type = method
            info.external_attr = 0o644 << 16
            z.writestr(info, data)
        z.comment = comment
    return buf.getvalue()


def zip64_archive():
    """Hand-built ZIP64 archive: saturated 32-bit fields with the ZIP64 extra field, a ZIP64
    end record and locator (what an IPSW larger than 4 GiB looks like, scaled down)."""
    name = b"Restore.plist"
    data = b"<plist><dict/></plist>\n"
    crc = zlib.crc32(data)
    extra_local = struct.pack("<HHQQ", 1, 16, len(data), len(data))
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, 0, 0, 0x21, crc,
                        0xFFFFFFFF, 0xFFFFFFFF, len(name), len(extra_local)) + name + extra_local
    body = local + data
    extra_cd = struct.pack("<HHQQQ", 1, 24, len(data), len(data), 0)
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 0, 0, 0x21, crc,
                          0xFFFFFFFF, 0xFFFFFFFF, len(name), len(extra_cd), 0, 0, 0, 0,
                          0xFFFFFFFF) + name + extra_cd
    cd_offset = len(body)
    zip64_offset = cd_offset + len(central)
    zip64_eocd = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, 1, 1,
                             len(central), cd_offset)
    locator = struct.pack("<IIQI", 0x07064B50, 0, zip64_offset, 1)
    eocd = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF,
                       0xFFFFFFFF, 0)
    return body + central + zip64_eocd + locator + eocd


write("zip_central_directory", "seed-ipsw-like.zip", fixed_zip([
    ("Firmware/", b"", zipfile.ZIP_STORED),
    ("BuildManifest.plist", MANIFEST_SNIPPET, zipfile.ZIP_DEFLATED),
    ("Firmware/dfu/iBSS.j274.RELEASE.im4p", bytes(range(64)), zipfile.ZIP_STORED),
]))
write("zip_central_directory", "seed-comment.zip", fixed_zip([
    ("RestoreVersion.plist", b"<plist/>", zipfile.ZIP_STORED),
], comment=b"PK\x05\x06 a comment that looks like an end record"))
write("zip_central_directory", "seed-deflated.zip", fixed_zip([
    ("a.txt", b"abcabcabcabc" * 20, zipfile.ZIP_DEFLATED),
    ("b.bin", b"\x00" * 200, zipfile.ZIP_DEFLATED),
]))
write("zip_central_directory", "seed-zip64.zip", zip64_archive())

# ----- catalog -----------------------------------------------------------------------------

CATALOG_2026 = os.path.join(FIX, "catalogs", "com_apple_macOSIPSW.2026-03-12.26.3.1+26.3.2.xml")
CATALOG_2025 = os.path.join(FIX, "catalogs", "com_apple_macOSIPSW.2025-12-21.26.2_25C56.xml")
with open(CATALOG_2026, "rb") as f:
    new = plistlib.load(f)["MobileDeviceSoftwareVersionsByVersion"]["1"]["MobileDeviceSoftwareVersions"]
with open(CATALOG_2025, "rb") as f:
    old = plistlib.load(f)["MobileDeviceSoftwareVersionsByVersion"]["1"]["MobileDeviceSoftwareVersions"]
versions = {
    "Mac16,1": dict(new["Mac16,1"]),
    "VirtualMac2,1": dict(new["VirtualMac2,1"]),
}
# Two real builds for one product (the 2025 catalog's 25C56 beside the 2026 one) and an
# alias entry, so sorting, deduplication and SameAs are all exercised.
mac14 = dict(new["Mac14,2"])
mac14["25C56"] = old["Mac14,2"]["25C56"]
mac14["Alias"] = {"SameAs": "25C56"}
versions["Mac14,2"] = mac14
catalog = {"MobileDeviceSoftwareVersionsByVersion": {"1": {"MobileDeviceSoftwareVersions": versions}}}
write("catalog", "seed-mesu-excerpt.plist", plistlib.dumps(catalog, sort_keys=False))
write("catalog", "seed-ipsw-me.json", b"""{"name":"Mac mini (M1, 2020)","identifier":"Macmini9,1",
"firmwares":[{"identifier":"Macmini9,1","version":"26.2","buildid":"25C56",
"sha1sum":"f034b05ce26abe3c8e5ae8f1f6574119b10cafbe","md5sum":"","filesize":1,
"url":"https://updates.cdn-apple.com/2025FallFCS/fullrestores/093-37399/E144C918-CF99-4BBC-B1D0-3E739B9A3F2D/UniversalMac_26.2_25C56_Restore.ipsw",
"signed":true},{"identifier":"Macmini9,1","version":"15.4.1","buildid":"24E263","sha1sum":"",
"url":"http://example.invalid/UniversalMac_15.4.1_24E263_Restore.ipsw","signed":false},
{"identifier":"Macmini9,1","version":"26.3","buildid":"25D125","url":"protected://x"}]}
""")

# ----- manifest ----------------------------------------------------------------------------

with open(os.path.join(FIX, "manifests", "macOS_26.2_25C56_PreflightBuildManifests",
                       "J274AP.BuildManifest.plist"), "rb") as f:
    manifest = plistlib.load(f)
identity = manifest["BuildIdentities"][0]
keep_info = ["BuildNumber", "BuildTrain", "DeviceClass", "RestoreBehavior", "Variant"]
info = {k: identity["Info"][k] for k in keep_info}
info["Variant"] = "macOS Customer"
info["RestoreBehavior"] = "Erase"
info["MacOSVariant"] = "Customer"


def component(name, **flags):
    c = identity["Manifest"][name]
    out_info = {k: v for k, v in c["Info"].items() if k in (
        "IsLoadedByiBoot", "IsLoadedByiBootStage1", "IsFirmwarePayload", "Path", "Img4PayloadType")}
    out_info.update(flags)
    return {"Digest": c["Digest"][:8], "Info": out_info, "Trusted": c.get("Trusted", True)}


components = {
    "ANE": component("ANE"),
    "iBEC": component("iBEC"),
    # Preflight manifests carry no iBSS; the IPSW's manifest does, at the iBEC path's sibling.
    "iBSS": component("iBEC", Path="Firmware/dfu/iBSS.j274.RELEASE.im4p"),
    "iBootData": component("iBootData", IsLoadedByiBootStage1=True),
    "RestoreDeviceTree": component("RestoreDeviceTree"),
    "RestoreKernelCache": component("RestoreKernelCache"),
    "RestoreLogo": component("RestoreLogo"),
    "RestoreRamDisk": component("RestoreRamDisk"),
}
trimmed = {
    "BuildIdentities": [{
        "ApBoardID": identity["ApBoardID"],
        "ApChipID": identity["ApChipID"],
        "ApSecurityDomain": identity["ApSecurityDomain"],
        "Info": info,
        "Manifest": components,
    }],
    "ManifestVersion": manifest["ManifestVersion"],
    "ProductBuildVersion": manifest["ProductBuildVersion"],
    "ProductVersion": manifest["ProductVersion"],
    "SupportedProductTypes": ["Macmini9,1", "Mac14,2"],
}
write("manifest", "seed-j274ap-erase.plist", plistlib.dumps(trimmed, sort_keys=False))
# The same identity as an Update one beside it, in binary plist form.
update = dict(trimmed["BuildIdentities"][0])
update["Info"] = dict(info, RestoreBehavior="Update", Variant="macOS Customer Software Update")
trimmed["BuildIdentities"].append(update)
write("manifest", "seed-j274ap-two.bplist", plistlib.dumps(trimmed, fmt=plistlib.FMT_BINARY))

# ----- img4 --------------------------------------------------------------------------------


def der(tag, content):
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        b = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(b)]) + b
    return bytes([tag]) + length + content


def ia5(s):
    return der(0x16, s)


with open(os.path.join(FIX, "tss", "PyIMG4-IM4M.der"), "rb") as f:
    im4m = f.read()
with open(os.path.join(FIX, "tss", "PyIMG4-IM4R.der"), "rb") as f:
    im4r = f.read()
im4p = der(0x30, ia5(b"IM4P") + ia5(b"ibss") + ia5(b"iBoot-13822.61.10") +
           der(0x04, bytes(range(48))))
write("img4", "seed-im4m.der", im4m)
write("img4", "seed-im4r.der", im4r)
write("img4", "seed-im4p.der", im4p)
write("img4", "seed-img4.der", der(0x30, ia5(b"IMG4") + im4p + der(0xA0, im4m) + der(0xA1, im4r)))

# ----- tss_response ------------------------------------------------------------------------

tickets = {
    "ApImg4Ticket": im4m,
    "SEP-TBM": {"ucon": b"\x01\x02", "ucer": b"\x03\x04"},
}
body = plistlib.dumps(tickets).decode()
write("tss_response", "seed-success",
      ("STATUS=0&MESSAGE=SUCCESS&REQUEST_STRING=" + body).encode())
write("tss_response", "seed-not-signed",
      b"STATUS=94&MESSAGE=This device isn't eligible for the requested build.")
write("tss_response", "seed-small-ticket",
      b"STATUS=0&MESSAGE=SUCCESS&REQUEST_STRING=<?xml version=\"1.0\"?><plist version=\"1.0\">"
      b"<dict><key>ApImg4Ticket</key><data>" + base64.b64encode(der(0x30, ia5(b"IM4M"))) +
      b"</data></dict></plist>")

# ----- usbmux ------------------------------------------------------------------------------
# Op streams for harness::usbmux (see its documentation in fuzz/harness.rs): op byte, length
# byte, then the op's bytes.


def op(kind, data=b""):
    return bytes([kind, len(data)]) + data


def tcp(conn, flags, seq_delta, payload):
    return op(2, bytes([conn, flags, seq_delta]) + payload)


write("usbmux", "seed-data-then-reset",
      tcp(0, 0x10, 0, b"hello from lockdownd") + op(4, b"\x02\x00\x10") +
      tcp(0, 0x10, 0, b"more") + tcp(0, 0x14, 0, b"bye\n"))
write("usbmux", "seed-refused-and-control",
      tcp(1, 0x14, 0, b"refused") + op(1, b"\x01\x03Something went wrong\n") +
      op(4, b"\x00\x1f\x5e") + tcp(2, 0x12, 0, b""))
write("usbmux", "seed-raw-and-large",
      op(0, b"\x00\x00\x00\x06\x00\x00\x00\x24\xfe\xed\xfa\xce\x00\x01\x00\x02") +
      op(3, b"\x01\x40") + op(3, b"\x00\x20") + op(5) + op(4, b"\x01\x00\xff") +
      op(4, b"\x03\x00\x00") + op(4, b"\x05\x00\x00"))

# ----- restored_framing, asr_commands ------------------------------------------------------
# Stream inputs: pieces of at most 255 bytes, each preceded by its length byte.


def pieces(stream, size):
    out = b""
    for i in range(0, len(stream), size):
        piece = stream[i:i + size]
        out += bytes([len(piece)]) + piece
    return out


def frame(body):
    return struct.pack(">I", len(body)) + body


request = plistlib.dumps({"MsgType": "DataRequestMsg", "DataType": "SystemImageData"})
status = plistlib.dumps({"MsgType": "StatusMsg", "Status": 0, "Progress": 42},
                        fmt=plistlib.FMT_BINARY)
progress = plistlib.dumps({"MsgType": "ProgressMsg", "Operation": 14, "Progress": 100,
                           "Data": b"\x00\x01"}, fmt=plistlib.FMT_BINARY)
write("restored_framing", "seed-xml-then-binary",
      pieces(frame(request) + frame(status), 200))
write("restored_framing", "seed-small-pieces", pieces(frame(progress) + frame(b"\n" + request), 7))

initiate = plistlib.dumps({"Command": "Initiate", "Checksum Chunks": True}) + b"\n"
oob = plistlib.dumps({"Command": "OOBData", "OOB Offset": 4096, "OOB Length": 512}) + b"\n"
payload = plistlib.dumps({"Command": "Payload"}) + b"\n"
write("asr_commands", "seed-session", pieces(initiate + oob + oob + payload, 255))
write("asr_commands", "seed-small-pieces", pieces(b"  " + initiate + payload, 13))

# ----- firmware_updater ------------------------------------------------------------------------
# FirmwareUpdaterData Arguments (protocol.md §4.9) as restored sends them, and an RTKit FTAB.

retimer = {
    "MessageArgType": "FirmwareResponseData",
    "MessageArgUpdaterName": "AppleTypeCRetimer",
    "MessageArgInfo": {
        "APInfo": {"ApProductionMode": True},
        "InfoArray": [{"TagNumber": 1, "TicketName": "Timer,Ticket",
                       "HardwareID": {"ChipID": 0x6600, "BoardID": 1, "ECID": 0x1234,
                                      "Nonce": b"\x4e" * 32, "SecurityMode": True,
                                      "SecurityDomain": 1, "ProductionStatus": True}}],
    },
    "DeviceGeneratedTags": {"ResponseTags": ["Timer,Ticket", "FirmwareData"]},
}
tcon = {
    "MessageArgType": "FirmwareResponseData",
    "MessageArgUpdaterName": "AppleTCON",
    "MessageArgInfo": {"Baobab,BoardID": 7, "Baobab,ECID": b"\x0b" * 8,
                       "Baobab,ProductionMode": True, "Baobab,UpdateNonce": b"\x55" * 20},
    "DeviceGeneratedTags": {"ResponseTags": ["Baobab,Ticket", "FirmwareData"]},
}
ace3 = {
    "MessageArgType": "FirmwareResponseData",
    "MessageArgUpdaterName": "Ace3",
    "MessageArgInfo": {},
    "DeviceGeneratedTags": {"ResponseTags": ["USBPortController1,Ticket"]},
    "DeviceGeneratedRequest": {"@USBPortController1,Ticket": True,
                               "USBPortController1,Nonce": b"\x01" * 32},
}
write("firmware_updater", "seed-retimer", plistlib.dumps(retimer, fmt=plistlib.FMT_BINARY))
write("firmware_updater", "seed-tcon", plistlib.dumps(tcon))
write("firmware_updater", "seed-ace3", plistlib.dumps(ace3, fmt=plistlib.FMT_BINARY))
ftab_entries = [(b"rkos", b"rtkit-os"), (b"rrko", b"restore")]
header = struct.pack("<II", 1, 0xFFFFFFFF) + b"\0" * 24 + b"rkosftab" \
    + struct.pack("<II", len(ftab_entries), 0)
offset = 0x30 + 16 * len(ftab_entries)
records = b""
for tag, blob in ftab_entries:
    records += tag + struct.pack("<III", offset, len(blob), 0)
    offset += len(blob)
write("firmware_updater", "seed-ftab", header + records + b"".join(b for _, b in ftab_entries))
