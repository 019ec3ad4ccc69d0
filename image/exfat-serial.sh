#!/usr/bin/env bash
# Give an exFAT file system made by mkfs.exfat a fixed volume serial number, so the same inputs
# give the same image bytes. mkfs.exfat (exfatprogs 1.2) derives the serial from the clock and
# has no option to set it; the serial is covered by the boot-region checksum, which is
# recomputed here (exFAT spec §3.4: sectors 0–10, skipping VolumeFlags and PercentInUse).
#
# usage: exfat-serial.sh FILE SERIAL_HEX   (the file holds just the file system)
set -euo pipefail
[[ $# -eq 2 ]] || { echo "usage: $0 FILE SERIAL_HEX" >&2; exit 1; }
FILE="$1"
SERIAL=$((16#$2))

[[ "$(dd if="$FILE" bs=1 skip=3 count=8 status=none)" == "EXFAT   " ]] ||
    { echo "$FILE is not an exFAT file system" >&2; exit 1; }
SHIFT=$(od -An -tu1 -j108 -N1 "$FILE" | tr -d ' ')
SECTOR=$((1 << SHIFT))

# le32 VALUE → the 4 bytes as printf escapes.
le32() { printf '\\x%02x\\x%02x\\x%02x\\x%02x' $(($1 & 255)) $((($1 >> 8) & 255)) $((($1 >> 16) & 255)) $((($1 >> 24) & 255)); }

printf "$(le32 "$SERIAL")" | dd of="$FILE" bs=1 seek=100 conv=notrunc status=none

sum=0
i=0
for b in $(od -An -v -tu1 -N $((11 * SECTOR)) "$FILE"); do
    if ((i != 106 && i != 107 && i != 112)); then
        sum=$(((((sum & 1) << 31) | (sum >> 1)) + b & 0xFFFFFFFF))
    fi
    i=$((i + 1))
done
# Sector 11 is the checksum repeated; sectors 12–23 back up sectors 0–11.
one="$(le32 "$sum")"
rep=""
for ((k = 0; k < SECTOR / 4; k++)); do rep+="$one"; done
printf "$rep" | dd of="$FILE" bs="$SECTOR" seek=11 conv=notrunc status=none
dd if="$FILE" of="$FILE" bs="$SECTOR" count=12 seek=12 conv=notrunc status=none
