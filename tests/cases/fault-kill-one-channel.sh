# one of 4 channels is reset under verified I/O: its requests move to the others, the helper replaces it, nothing is lost
# timeout: 420
load_enbd request_timeout=5 dead_timeout=120
make_backing /tmp/disk.img 256
start_server 10809 disk=/tmp/disk.img
connect_enbd /dev/enbd0 10809 disk --channels 4 --retry-max 1
# 1.5 GiB of verified I/O: still running after the resets below, however
# fast this guest is; reads beside it keep requests on every channel.
fio_verify_start /dev/enbd0 1536
read_load_start /dev/enbd0
sleep 8
# Reset a connection seen carrying requests (bytes queued on it), one at a
# time under load until a reset moved requests (5 tries): a reply may still
# clear the connection between the look and the reset.
before=$(tag_field enbd0 stats resubmits)
after=$before
kills=0
while [ "$after" = "$before" ] && [ "$kills" -lt 5 ]; do
	[ ! -f /tmp/fio.rc ] || fail "fio ended before a channel with requests was reset"
	ports=($(channel_ports 10809))
	[ "${#ports[@]}" = 4 ] || fail "expected 4 connections, found ${#ports[@]}"
	port=$(wait_loaded_port 10809 10) || fail "no connection carried requests for 10 s"
	kill_conn 10809 "$port"
	kills=$((kills + 1))
	wait_for 30 channels_are enbd0 4 || fail "channel not replaced"
	channel_ports 10809 | grep -qx "$port" && fail "the reset connection (port $port) is still there"
	after=$(tag_field enbd0 stats resubmits)
	echo "reset $kills (port $port): resubmits $before -> $after"
done
read_load_stop
[ "$after" -gt "$before" ] || fail "no request moved to another channel in $kills resets (resubmits stayed $after)"
grep '^enbd0 ' /proc/nbdinfo
# request_timeout 5 s + 1 s: a reset channel's requests go on at once.
fio_verify_finish 300 6000
# (The kernel rate-limits channel messages: 10 per 5 s, so count at least one.)
case_log | grep -qE 'enbd0: channel [0-9]+ dropped' || fail "no channel drop in this case's kernel log"
[ "$(channels_started)" -ge 5 ] || fail "the reset channel was not replaced ($(channels_started) channels started)"
grep '^enbd0 stats' /proc/nbdinfo
run "$CLIENT" disconnect /dev/enbd0
