# invalid NBD_INFO_BLOCK_SIZE announcements refuse connect with a clear error; 4096/4096/64K gives 4 KiB sectors, 64 KiB requests and intact data
# timeout: 240
# The rogue server announces the given MIN,PREF,MAX (requested or not) and
# answers requests that break them with EINVAL, logging "block size
# violation", so the valid case also checks that neither I/O nor keep-alive
# probes break the announced sizes.
load_enbd keepalive_interval=1
make_backing /tmp/disk.img 64
port=10809
for bs in 1,1,512 8192,8192,1048576 512,4096,1024 512,256,4096 512,512,511; do
	start_rogue "$port" /tmp/disk.img --block-sizes "$bs"
	echo "+ $CLIENT connect /dev/enbd0 127.0.0.1:$port --export disk (server block sizes $bs)" >&2
	run_bounded 30 "$CLIENT" connect /dev/enbd0 "127.0.0.1:$port" --export disk \
		--log "/tmp/enbd-client-bs-$port.log" >/tmp/connect.out 2>&1 ||
		fail "connect with block sizes $bs still running after 30 s"
	echo "block sizes $bs: rc $BOUNDED_RC: $(cat /tmp/connect.out)"
	[ "$BOUNDED_RC" != 0 ] || fail "connect accepted block sizes $bs"
	grep -qi 'block size' /tmp/connect.out || fail "the error for block sizes $bs does not name the block size"
	expect_eq "$(proc_field enbd0 state)" unconfigured "state after refusing $bs"
	expect_eq "$(blockdev --getsize64 /dev/enbd0)" 0 "size after refusing $bs"
	wait_for 5 eval '! helper_running' || fail "a helper runs after the refused connect ($bs)"
	! case_log | grep -E 'WARNING|BUG' || fail "kernel warning after block sizes $bs"
	stop_rogue
	port=$((port + 1))
done

# Valid but unusual: 4 KiB minimum, 64 KiB maximum.
start_rogue "$port" /tmp/disk.img --block-sizes 4096,4096,65536
connect_enbd /dev/enbd0 "$port" disk --channels 2 --retry-max 1
grep '^enbd0 ' /proc/nbdinfo
expect_eq "$(blockdev --getss /dev/enbd0)" 4096 "logical block size"
expect_eq "$(proc_field enbd0 blksize)" 4096 "blksize in /proc/nbdinfo"
kb=$(cat /sys/block/enbd0/queue/max_hw_sectors_kb)
echo "max_hw_sectors_kb: $kb"
[ "$kb" -le 64 ] || fail "max_hw_sectors_kb is $kb, over the server's 64 KiB maximum"
head -c 1M /dev/urandom >/tmp/bs.bin
sum=$(md5sum </tmp/bs.bin | cut -d' ' -f1)
# 1 MiB requests: the block layer splits them into 64 KiB pieces.
run dd if=/tmp/bs.bin of=/dev/enbd0 bs=1M seek=3 count=1 oflag=direct status=none
expect_eq "$(dd if=/dev/enbd0 bs=1M skip=3 count=1 iflag=direct status=none | md5sum | cut -d' ' -f1)" "$sum" "1 MiB read back"
run dd if=/tmp/bs.bin of=/dev/enbd0 bs=64k seek=80 oflag=direct status=none
expect_eq "$(dd if=/dev/enbd0 bs=64k skip=80 count=16 iflag=direct status=none | md5sum | cut -d' ' -f1)" "$sum" "64 KiB pieces read back"
# A 512-byte direct read is below the logical block size.
must_fail "" dd if=/dev/enbd0 of=/dev/null bs=512 count=1 iflag=direct status=none
# Idle for a few keep-alive intervals: the probes must respect the sizes too.
sleep 3
grep '^enbd0 channel' /proc/nbdinfo
grep -q 'block size violation' "$ROGUE_LOG" &&
	fail "requests broke the announced block sizes: $(grep 'block size violation' "$ROGUE_LOG" | head -n3)"
expect_eq "$(tag_field enbd0 stats errors)" 0 "errors"
run "$CLIENT" disconnect /dev/enbd0
expect_eq "$(dd if=/tmp/disk.img bs=1M skip=3 count=1 status=none | md5sum | cut -d' ' -f1)" "$sum" "backing file at 3 MiB"
expect_eq "$(dd if=/tmp/disk.img bs=64k skip=80 count=16 status=none | md5sum | cut -d' ' -f1)" "$sum" "backing file at 5 MiB"
