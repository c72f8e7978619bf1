# an image served ro with checksums (enbd-server checksum, ,crc) reads right; a byte flipped in it fails reads of its 16 MiB block alone with EIO and a log line naming the block; the scrub finds a flip in a block already read; a writable export or a corrupt checksum file is refused
# timeout: 180
MiB16=$((16 << 20))
img=/tmp/disk.img

# XORs the byte at offset $2 of file $1 with 0x40.
flip_byte() {
	local b
	b=$(dd if="$1" bs=1 skip="$2" count=1 status=none | od -An -tu1 | tr -d ' ')
	# shellcheck disable=SC2059 # the format is the byte, as an octal escape
	printf "\\$(printf %03o $((b ^ 0x40)))" | dd of="$1" bs=1 seek="$2" count=1 conv=notrunc status=none ||
		fail "cannot flip byte $2 of $1"
}

# md5 of 16 MiB block $2 of $1; reads of the device bypass its page cache.
block_md5() {
	local flag=
	[ -b "$1" ] && flag=iflag=direct
	dd if="$1" bs=1M skip=$(($2 * 16)) count=16 $flag status=none | md5sum | cut -d' ' -f1
}

# Reads block $2 of device $1 and fails the case unless that is an I/O error.
block_fails() {
	local rc=0
	dd if="$1" of=/dev/null bs=1M skip=$(($2 * 16)) count=16 iflag=direct status=none 2>/tmp/dd.err || rc=$?
	cat /tmp/dd.err >&2
	[ "$rc" != 0 ] || return 1
	grep -q "Input/output error" /tmp/dd.err || fail "reading block $2 failed, but not with an I/O error"
}

stop_server() {
	run "$CLIENT" disconnect /dev/enbd0
	kill "$SERVER_PID"
	wait "$SERVER_PID" 2>/dev/null
}

load_enbd
make_backing "$img" 64
sum=$(write_random "$img" 64)
rm -f /tmp/random-64.bin # /tmp is small
run "$SERVER" checksum "$img"
# Header (40) + 4 blocks x 4 + its own CRC (4).
expect_eq "$(stat -c %s "$img.crc")" 60 "size of the checksum file"
run "$SERVER" verify "$img"

# Refused at start: a writable export, and a corrupt checksum file.
must_fail "need a read-only export" timeout 10 "$SERVER" --listen 127.0.0.1:10819 --export "d=$img,crc"
run cp "$img.crc" /tmp/bad.crc
flip_byte /tmp/bad.crc 45
must_fail "corrupt" timeout 10 "$SERVER" --listen 127.0.0.1:10819 --export "d=$img,ro,crc=/tmp/bad.crc"
rm -f /tmp/bad.crc

# Good image: the device reads exactly the image, every block verified.
start_server 10809 "d=$img,ro,crc"
connect_enbd /dev/enbd0 10809 d
expect_eq "$(md5_of /dev/enbd0 64)" "$sum" "data of the checksummed export"
grep -q 'checksum mismatch' /tmp/enbd-server-10809.log && fail "a good image was found bad"
stop_server

# A byte flipped in block 2. A fresh server, so block 2 is not yet known
# good (the first one verified it, and would answer only after a scrub).
flip_byte "$img" $((2 * MiB16 + 12345))
must_fail "^bad block 2: bytes 33554432\.\.50331648$" "$SERVER" verify "$img"
start_server 10810 "d=$img,ro,crc,scrub=0"
connect_enbd /dev/enbd0 10810 d
block_fails /dev/enbd0 2 || fail "block 2 read although its checksum does not match"
# Refused again, this time as a block known bad.
block_fails /dev/enbd0 2 || fail "block 2 read on the second try"
for b in 0 1 3; do
	expect_eq "$(block_md5 /dev/enbd0 $b)" "$(block_md5 "$img" $b)" "block $b beside the bad one"
done
grep -E 'checksum mismatch \(first read\): block 2 \(bytes 33554432\.\.50331648\)' /tmp/enbd-server-10810.log ||
	fail "the server did not log the bad block 2"
expect_eq "$(grep -c 'checksum mismatch' /tmp/enbd-server-10810.log)" 1 "checksum mismatch lines"
stop_server

# The scrub: block 1 is read (verified good), then changed underneath; a
# scrub every 2 s (at 32 MiB/s, 2 s a pass) finds it, and reads of it fail.
start_server 10811 "d=$img,ro,crc,scrub=2"
connect_enbd /dev/enbd0 10811 d
expect_eq "$(block_md5 /dev/enbd0 1)" "$(block_md5 "$img" 1)" "block 1 before the flip"
flip_byte "$img" $((MiB16 + 999))
wait_for 30 sh -c "! dd if=/dev/enbd0 of=/dev/null bs=1M skip=16 count=16 iflag=direct status=none" ||
	fail "block 1 still reads 30 s after it changed under a scrubbed export"
grep -E 'checksum mismatch \(scrub\): block 1 \(bytes 16777216\.\.33554432\)' /tmp/enbd-server-10811.log ||
	fail "the scrub did not log block 1"
expect_eq "$(block_md5 /dev/enbd0 0)" "$(block_md5 "$img" 0)" "block 0 after the scrub"
expect_eq "$(block_md5 /dev/enbd0 3)" "$(block_md5 "$img" 3)" "block 3 after the scrub"
stop_server
rm -f "$img" "$img.crc"
