# 1,000 idle connections from 1,000 loopback addresses do not keep a good client out: the oldest handshakes are evicted (--max-handshakes 64)
# timeout: 120
make_backing /tmp/disk.img 64
start_server 10809 disk=/tmp/disk.img
# Held 25 s: less than the 30 s handshake timeout, so eviction is what
# closes them, not the timeout.
python3 "$ENBD_ROOT/tests/tools/nbdflood.py" idle 127.0.0.1 10809 1000 25 >/tmp/flood.out 2>&1 &
FLOOD=$!
wait_for 60 grep -q '^opened 1000' /tmp/flood.out || { cat /tmp/flood.out; fail "the flood did not open its connections"; }
# No more handshakes than the cap (plus the accept, signal and main threads).
# An evicted handshake's thread exits once it sees its socket shut down, so
# the count may lag the evictions by a moment (82 seen once under load).
server_threads() { awk '/^Threads:/ { print $2 }' /proc/"$SERVER_PID"/status; }
few_threads() { [ "$(server_threads)" -le 70 ]; }
echo "server threads with 1000 idle connections open: $(server_threads)"
wait_for 5 few_threads ||
	fail "$(server_threads) server threads 5 s later: idle handshakes are not evicted"
echo "server threads: $(server_threads)"
# A good client connects and does I/O within seconds, while all of them
# are still open.
head -c 4M /dev/urandom >/tmp/src.bin
start=$(now_ms)
run timeout 10 qemu-img convert -n -f raw -O raw /tmp/src.bin nbd://127.0.0.1:10809/disk
run timeout 10 qemu-img convert -f raw -O raw nbd://127.0.0.1:10809/disk /tmp/back.raw
took=$(($(now_ms) - start))
echo "good client's write and read back took ${took} ms"
[ "$took" -lt 10000 ] || fail "the good client took ${took} ms"
expect_eq "$(head -c 4M /tmp/back.raw | md5sum | cut -d' ' -f1)" "$(md5sum </tmp/src.bin | cut -d' ' -f1)" "data read back"
run timeout 10 nbdinfo nbd://127.0.0.1:10809/disk >/dev/null
wait "$FLOOD" || fail "the flood client failed"
cat /tmp/flood.out
closed=$(sed -n 's/^closed-by-server //p' /tmp/flood.out)
# All but the newest 64 were evicted (the good client's connections evicted
# a few more).
[ "$closed" -ge 936 ] || fail "only $closed of 1000 idle connections were evicted"
kill -0 "$SERVER_PID" || fail "server died"
grep -q 'evicted during the handshake by newer ones' /tmp/enbd-server-10809.log || fail "evictions not logged"
