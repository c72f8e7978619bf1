# a read the server cannot serve (its image cut short underneath) fails alone with EIO; the connection and other reads go on
# timeout: 120
load_enbd request_timeout=5
make_backing /tmp/disk.img 64
sum=$(write_random /tmp/disk.img 16)
start_server 10809 disk=/tmp/disk.img
connect_enbd /dev/enbd0 10809 disk --channels 2
expect_eq "$(md5_of /dev/enbd0 16)" "$sum" "data before the cut"
# The export keeps its size (64 MiB); the file behind it now ends at 32 MiB.
run truncate -s 32M /tmp/disk.img
rc=0
dd if=/dev/enbd0 of=/dev/null bs=4k skip=$((48 * 256)) count=1 iflag=direct status=none 2>/tmp/dd.err || rc=$?
cat /tmp/dd.err
[ "$rc" != 0 ] || fail "a read past the end of the cut file succeeded"
grep -q "Input/output error" /tmp/dd.err || fail "the failed read is not an I/O error"
# That request alone: the others are served, no channel was dropped and
# nothing was resubmitted.
expect_eq "$(md5_of /dev/enbd0 16)" "$sum" "data after the failed read"
expect_eq "$(proc_field enbd0 channels)" 2 "channels after the failed read"
case_log | grep -E 'enbd0: channel [0-9]+ dropped' && fail "a channel was dropped for a read error"
expect_eq "$(tag_field enbd0 stats resubmits)" 0 "resubmits"
grep -q 'READ at' /tmp/enbd-server-10809.log || fail "the server did not log the failed read"
run "$CLIENT" disconnect /dev/enbd0
