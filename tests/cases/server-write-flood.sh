# a client that pipelines 32 MiB writes and never reads replies keeps the server's RSS under its per-connection budget plus overhead; the send timeout or killing the client frees it
# timeout: 180
make_backing /tmp/disk.img 256
"$SERVER" --listen 127.0.0.1:10809 --export disk=/tmp/disk.img --send-timeout 10 >/tmp/enbd-server-10809.log 2>&1 &
SERVER_PID=$!
wait_port 10809
kib() { awk -v k="$1" '$1 == k":" { print $2 }' /proc/"$SERVER_PID"/status; }
base=$(kib VmRSS)
# The bound: --max-inflight-per-connection (64 MiB) for the stuck client,
# the buffer pool (64 MiB at most) and 32 MiB for everything else.
bound=$((base + (64 + 64 + 32) * 1024))
# 8 READs of 32 MiB whose replies fill the socket (the workers are stuck
# sending them), then 64 WRITEs of 32 MiB (2 GiB): without a budget they
# pile up in the server (the old code reached 1.1 GiB).
flood() {
	python3 "$ENBD_ROOT/tests/tools/nbdflood.py" write 127.0.0.1 10809 disk 8 64 $((32 << 20)) >"$1" 2>&1 &
	FLOOD=$!
	wait_for 20 grep -q negotiated "$1" || fail "the flood client did not connect"
	sleep 5
}
flood /tmp/flood1.out
hwm=$(kib VmHWM)
echo "server RSS: baseline ${base} KiB, peak ${hwm} KiB with the client stuck, bound ${bound} KiB"
tail -n1 /tmp/flood1.out
[ "$hwm" -le "$bound" ] || fail "server peak RSS ${hwm} KiB exceeds ${bound} KiB"
# A good client still works meanwhile.
head -c 4M /dev/urandom >/tmp/src.bin
sum=$(md5sum </tmp/src.bin | cut -d' ' -f1)
run timeout 20 qemu-img convert -n -f raw -O raw /tmp/src.bin nbd://127.0.0.1:10809/disk
run timeout 20 qemu-img convert -f raw -O raw nbd://127.0.0.1:10809/disk /tmp/back.raw
expect_eq "$(head -c 4M /tmp/back.raw | md5sum | cut -d' ' -f1)" "$sum" "good client's data"
# Killing the bad client frees what it held.
kill "$FLOOD"
wait "$FLOOD" 2>/dev/null
wait_for 10 sh -c "[ \$(awk '/^VmRSS:/ { print \$2 }' /proc/$SERVER_PID/status) -le $((base + 32 * 1024)) ]" ||
	fail "RSS $(kib VmRSS) KiB after the client was killed (baseline $base KiB)"
# Left alone, a client that never reads is dropped by the send timeout (10 s).
died() { [ "$(grep -c 'connection died' /tmp/enbd-server-10809.log)" -gt "$1" ]; }
before=$(grep -c 'connection died' /tmp/enbd-server-10809.log)
flood /tmp/flood2.out
wait_for 30 died "$before" || fail "the stuck client was not dropped"
wait_for 10 sh -c "[ \$(awk '/^VmRSS:/ { print \$2 }' /proc/$SERVER_PID/status) -le $((base + 32 * 1024)) ]" ||
	fail "RSS $(kib VmRSS) KiB after the send timeout (baseline $base KiB)"
kill "$FLOOD" 2>/dev/null || true  # it may have exited when dropped
kill -0 "$SERVER_PID" || fail "server died"
run timeout 10 nbdinfo nbd://127.0.0.1:10809/disk >/dev/null
