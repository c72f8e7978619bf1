# all channels are reset at once under verified I/O: requests wait, the helper reconnects, nothing is lost
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
# Reset every channel while requests are in flight, so some must be
# resubmitted; should none have been (all idle that instant), again (3 tries).
before=$(tag_field enbd0 stats resubmits)
after=$before
rounds=0
while [ "$after" = "$before" ] && [ "$rounds" -lt 3 ]; do
	[ ! -f /tmp/fio.rc ] || fail "fio ended before the channels were reset under load"
	wait_for 10 io_in_flight enbd0 || fail "no request in flight on enbd0"
	old=$(channel_ports 10809)
	run ss -K state established "( dport = :10809 )"
	rounds=$((rounds + 1))
	wait_for 30 channels_are enbd0 4 || fail "channels not reconnected"
	survivors=$(channel_ports 10809 | grep -Fx -f <(echo "$old"))
	[ -z "$survivors" ] || fail "connections survived the reset (local ports: ${survivors//$'\n'/ })"
	after=$(tag_field enbd0 stats resubmits)
	echo "reset $rounds: resubmits $before -> $after"
done
read_load_stop
[ "$after" -gt "$before" ] || fail "no request was resubmitted after $rounds resets of every channel"
# request_timeout 5 s + 1 s: requests wait only for the reconnection.
fio_verify_finish 300 6000
# (The kernel rate-limits channel messages: 10 per 5 s, enough for one round.)
case_log | grep -qE 'enbd0: channel [0-9]+ dropped' || fail "no channel drop in this case's kernel log"
[ "$(channels_started)" -ge 8 ] || fail "channels were not all replaced ($(channels_started) started)"
grep '^enbd0 stats' /proc/nbdinfo
run "$CLIENT" disconnect /dev/enbd0
