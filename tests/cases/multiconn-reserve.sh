# without CAN_MULTI_CONN one channel is active and the others are reserves that get only probes; when the active one dies a reserve takes over under verified I/O
# timeout: 420
# The rogue server leaves out NBD_FLAG_CAN_MULTI_CONN, so with 3 channels
# only the oldest live one may carry requests. The test finds the active
# channel's TCP connection as the one that moved the most bytes (ss), resets
# it while fio verifies, and checks that exactly one reserve took over, fio
# saw no error and the longest stall stayed under request_timeout + 1 s.
load_enbd request_timeout=5 keepalive_interval=1
make_backing /tmp/disk.img 256
start_rogue 10809 /tmp/disk.img --no-multi-conn
connect_enbd /dev/enbd0 10809 disk --channels 3 --retry-max 1
wait_for 20 channels_are enbd0 3 || fail "3 channels expected, have $(proc_field enbd0 channels)"
wait_for 10 roles_are enbd0 1 2 || fail "expected 1 active and 2 reserve channels: $(channel_lines enbd0)"
channel_lines enbd0
active=$(channels_with_role enbd0 active)
reserves=$(channels_with_role enbd0 reserve)
echo "active channel: $active; reserves: ${reserves//$'\n'/ }"
before=$(chan_field enbd0 "$active" requests)

# I/O goes to the active channel only.
head -c 16M /dev/urandom >/tmp/mc.bin
sum=$(md5sum </tmp/mc.bin | cut -d' ' -f1)
run dd if=/tmp/mc.bin of=/dev/enbd0 bs=1M oflag=direct status=none
expect_eq "$(dd if=/dev/enbd0 bs=1M count=16 iflag=direct status=none | md5sum | cut -d' ' -f1)" "$sum" "16 MiB read back"
sleep 2 # a few keep-alive intervals for the reserves
channel_lines enbd0
after=$(chan_field enbd0 "$active" requests)
echo "active channel $active: requests $before -> $after"
[ $((after - before)) -ge 32 ] || fail "the active channel carried only $((after - before)) requests for 16 MiB written and read"
for r in $reserves; do
	expect_eq "$(chan_field enbd0 "$r" requests)" 0 "requests on reserve channel $r"
	[ "$(chan_field enbd0 "$r" probes)" -ge 1 ] || fail "reserve channel $r was never probed"
done
expect_eq "$(channels_with_role enbd0 active)" "$active" "active channel after I/O"

# Reset the active channel's connection under verified I/O.
conn_bytes 10809
port=$(busiest_port 10809)
[ -n "$port" ] || fail "no connection to port 10809"
fio_verify_start /dev/enbd0 128
sleep 5
[ -f /tmp/fio.rc ] && fail "fio ended before the reset: $(cat /tmp/fio.out)"
kill_conn 10809 "$port"
# Exactly one channel is active, and it is one of the old reserves (the
# replacement channel may reuse the reset channel's id, as a reserve).
took_over() {
	local a
	a=$(channels_with_role enbd0 active)
	[ -n "$a" ] && [ "$(wc -l <<<"$a")" = 1 ] && grep -qx "$a" <<<"$reserves"
}
t0=$(now_ms)
wait_for 10 took_over || fail "no reserve took over: $(channel_lines enbd0)"
echo "a reserve was active $(($(now_ms) - t0)) ms after the reset"
channel_lines enbd0
case_log | grep -E "enbd0: channel $active dropped" || fail "the reset connection was not channel $active's"
wait_for 30 channels_are enbd0 3 || fail "the reset channel was not replaced ($(proc_field enbd0 channels))"
wait_for 10 roles_are enbd0 1 2 || fail "expected 1 active and 2 reserve channels after the failover: $(channel_lines enbd0)"
took_over || fail "the active channel is not one of the old reserves: $(channel_lines enbd0)"
new=$(channels_with_role enbd0 active)
echo "active channel after the reset: $new"
# Bound: request_timeout + 1 s.
fio_verify_finish 300 6000
channel_lines enbd0
expect_eq "$(channels_with_role enbd0 active)" "$new" "active channel after fio"
grep '^enbd0 stats' /proc/nbdinfo
run "$CLIENT" disconnect /dev/enbd0
