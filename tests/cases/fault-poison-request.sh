# a request that kills every connection it is sent on fails with EIO after max_resubmits; verified I/O elsewhere goes on unharmed
# timeout: 360
# The rogue server closes any connection that sends a request covering byte
# P (160 MiB). A direct read of the block at P must fail with EIO once it has
# been resubmitted max_resubmits (3) times, within 60 s, with one "giving up"
# line, while fio verifies the first 64 MiB on the same device throughout:
# 0 errors, and no I/O error logged outside the poisoned block. The number of
# "channel dropped" lines stays bounded (backoff, no reconnect storm).
load_enbd max_resubmits=3 request_timeout=5
expect_eq "$(cat /sys/module/enbd/parameters/max_resubmits)" 3 "max_resubmits"
make_backing /tmp/disk.img 256
P=$((160 << 20))
start_rogue 10809 /tmp/disk.img --poison "$P"
connect_enbd /dev/enbd0 10809 disk --channels 2 --retry-max 1
wait_for 10 channels_are enbd0 2 || fail "2 channels expected, have $(proc_field enbd0 channels)"

fio_verify_start_at /dev/enbd0 0 64 128
sleep 3
rm -f /tmp/dd.err
run_bounded 60 dd if=/dev/enbd0 of=/dev/null bs=4k skip=$((P / 4096)) count=1 iflag=direct status=none 2>/tmp/dd.err ||
	fail "the poisoned read is still blocked after 60 s"
cat /tmp/dd.err
echo "poisoned read failed after ${BOUNDED_MS} ms (bound 60 s), rc $BOUNDED_RC"
[ "$BOUNDED_RC" != 0 ] || fail "the poisoned read succeeded"
grep -qi 'input/output error' /tmp/dd.err || fail "the poisoned read did not fail with EIO"
[ -f /tmp/fio.rc ] && echo "note: fio had already finished when the poisoned read failed"
echo "poisoned requests seen by the server: $(grep -c '^[0-9.]* poisoned' "$ROGUE_LOG")"

case_log | grep 'giving up' || fail "the kernel did not log giving up"
n=$(case_log | grep -c 'enbd0: giving up')
[ "$n" = 1 ] || fail "$n requests gave up; only the poisoned read should have (the others were bystanders on the killed channels)"
case_log | grep -qE "enbd0: giving up on READ of [0-9]+ bytes at offset $P after 3 resubmits" ||
	fail "no 'giving up on READ ... at offset $P after 3 resubmits' line"
grep '^enbd0 stats' /proc/nbdinfo
gave_up=$(tag_field enbd0 stats gave_up)
[ -n "$gave_up" ] && [ "$gave_up" -ge 1 ] || fail "stats gave_up is '$gave_up', expected >= 1"

# The bystanders on each killed channel are resubmitted at once to the
# other one, or to a replacement (--retry-max 1): request_timeout + 1 s.
fio_verify_finish_except $((P / 512)) $((P / 512 + 7)) 6000
drops=$(case_log | grep -c 'enbd0: channel [0-9]* dropped')
echo "channel drops logged: $drops"
[ "$drops" -le 50 ] || fail "$drops channel drops logged (more than 50)"

# The device is still healthy: the helper brings the channels back.
wait_for 30 channels_are enbd0 2 || fail "channels not restored ($(proc_field enbd0 channels))"
head -c 1M /dev/urandom >/tmp/after.bin
run dd if=/tmp/after.bin of=/dev/enbd0 bs=1M seek=100 count=1 oflag=direct status=none
expect_eq "$(dd if=/dev/enbd0 bs=1M skip=100 count=1 iflag=direct status=none | md5sum)" \
	"$(md5sum </tmp/after.bin)" "data written after the poisoned read"
run "$CLIENT" disconnect /dev/enbd0
