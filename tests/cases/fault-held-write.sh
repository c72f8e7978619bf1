# a WRITE the server holds past request_timeout is fenced (its channel reset) before it is resubmitted; the stale copy never lands over a newer write
# timeout: 180
# The rogue server holds the first WRITE covering 1 MiB for 10 s. The kernel
# must reset the channel that carried it (write fencing) and only then send
# the write again elsewhere, so when the hold ends the server finds that
# connection gone and drops the stale copy instead of writing pattern A over
# the pattern B written in the meantime.
load_enbd request_timeout=3 keepalive_interval=1
make_backing /tmp/disk.img 64
start_rogue 10809 /tmp/disk.img --hold-write 1048576:10
connect_enbd /dev/enbd0 10809 disk --channels 2 --retry-max 1
wait_for 10 channels_are enbd0 2 || fail "2 channels expected, have $(proc_field enbd0 channels)"
head -c 4096 /dev/urandom >/tmp/patA
head -c 4096 /dev/urandom >/tmp/patB
md5A=$(md5sum </tmp/patA | cut -d' ' -f1)
md5B=$(md5sum </tmp/patB | cut -d' ' -f1)

# Pattern A: held by the server, must complete by resubmission.
startA=$(now_ms)
run_bounded 30 dd if=/tmp/patA of=/dev/enbd0 bs=4k seek=256 count=1 oflag=direct status=none ||
	fail "write A still blocked after 30 s"
echo "write A (held by the server): ${BOUNDED_MS} ms (request_timeout 3 s, hold 10 s)"
[ "$BOUNDED_RC" = 0 ] || fail "write A failed (rc $BOUNDED_RC)"
grep -q 'holding WRITE' "$ROGUE_LOG" || fail "the server never held a write: $(cat "$ROGUE_LOG")"
[ "$BOUNDED_MS" -le 6000 ] || fail "write A took ${BOUNDED_MS} ms, more than request_timeout + 3 s"

# Pattern B over the same block: no hold now, must be quick.
run_bounded 30 dd if=/tmp/patB of=/dev/enbd0 bs=4k seek=256 count=1 oflag=direct status=none ||
	fail "write B still blocked after 30 s"
echo "write B: ${BOUNDED_MS} ms"
[ "$BOUNDED_RC" = 0 ] || fail "write B failed (rc $BOUNDED_RC)"
[ "$BOUNDED_MS" -lt 3000 ] || fail "write B took ${BOUNDED_MS} ms"

# Let the hold run out: the server then decides about the stale copy of A.
rogue_log_wait 'held write (dropped|executed)' 20 || fail "the hold never ended: $(cat "$ROGUE_LOG")"
left=$((startA + 11000 - $(now_ms)))
[ "$left" -le 0 ] || sleep "$(awk -v ms="$left" 'BEGIN { printf "%.3f", ms / 1000 }')"
grep -E 'holding|held write|conn [0-9]+ .*clos' "$ROGUE_LOG"
grep -q 'held write executed' "$ROGUE_LOG" &&
	fail "the server executed the held write: its channel was not fenced"
grep -q 'held write dropped: connection gone' "$ROGUE_LOG" || fail "no 'held write dropped' in the server log"
grep -q 'held write dropped: connection gone (.*reset by peer' "$ROGUE_LOG" ||
	fail "the fenced channel was closed, not reset (expected a TCP RST)"

got=$(dd if=/dev/enbd0 bs=4k skip=256 count=1 iflag=direct status=none | md5sum | cut -d' ' -f1)
[ "$got" = "$md5B" ] || {
	[ "$got" = "$md5A" ] && fail "the block holds the stale pattern A"
	fail "the block holds neither pattern ($got)"
}
echo "block at 1 MiB reads back as pattern B"

case_log | grep -E 'enbd0: channel [0-9]+ dropped: write timed out' ||
	fail "the kernel did not log the fencing of the channel"
grep '^enbd0 stats' /proc/nbdinfo
[ "$(tag_field enbd0 stats resubmits)" -ge 1 ] || fail "no resubmission counted"
expect_eq "$(tag_field enbd0 stats errors)" 0 "errors"
run "$CLIENT" disconnect /dev/enbd0
got=$(dd if=/tmp/disk.img bs=4k skip=256 count=1 status=none | md5sum | cut -d' ' -f1)
[ "$got" = "$md5B" ] || fail "the backing file does not hold pattern B at 1 MiB"
echo "backing file holds pattern B"
