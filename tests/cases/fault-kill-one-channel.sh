# one of 4 channels is reset under verified I/O: its requests move to the others, the helper replaces it, nothing is lost
# timeout: 420
load_enbd request_timeout=5 dead_timeout=120
make_backing /tmp/disk.img 256
start_server 10809 disk=/tmp/disk.img
connect_enbd /dev/enbd0 10809 disk --channels 4 --retry-max 1
fio_verify_start /dev/enbd0
sleep 8
# A reset channel that happened to hold no request has nothing to move, so
# reset one at a time under load until a reset moved requests (3 tries).
before=$(tag_field enbd0 stats resubmits)
after=$before
kills=0
while [ "$after" = "$before" ] && [ "$kills" -lt 3 ]; do
	[ ! -f /tmp/fio.rc ] || fail "fio ended before a channel with requests was reset"
	wait_for 10 io_in_flight enbd0 || fail "no request in flight on enbd0"
	ports=($(channel_ports 10809))
	[ "${#ports[@]}" = 4 ] || fail "expected 4 connections, found ${#ports[@]}"
	port=$(loaded_port 10809)
	kill_conn 10809 "$port"
	kills=$((kills + 1))
	wait_for 30 channels_are enbd0 4 || fail "channel not replaced"
	channel_ports 10809 | grep -qx "$port" && fail "the reset connection (port $port) is still there"
	after=$(tag_field enbd0 stats resubmits)
	echo "reset $kills (port $port): resubmits $before -> $after"
done
[ "$after" -gt "$before" ] || fail "no request moved to another channel in $kills resets (resubmits stayed $after)"
grep '^enbd0 ' /proc/nbdinfo
# request_timeout 5 s + 1 s: a reset channel's requests go on at once.
fio_verify_finish 300 6000
# (The kernel rate-limits channel messages: 10 per 5 s, so count at least one.)
case_log | grep -qE 'enbd0: channel [0-9]+ dropped' || fail "no channel drop in this case's kernel log"
[ "$(channels_started)" -ge 5 ] || fail "the reset channel was not replaced ($(channels_started) channels started)"
grep '^enbd0 stats' /proc/nbdinfo
run "$CLIENT" disconnect /dev/enbd0
