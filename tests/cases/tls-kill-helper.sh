# kill -9 of the helper during TLS I/O: kernel TLS carries on with 0 errors, the guardian re-attaches and reconnects over TLS
# timeout: 420
load_enbd request_timeout=5 dead_timeout=120
make_certs
make_backing /tmp/disk.img 256
start_tls_server 10809 --export disk=/tmp/disk.img
connect_enbd /dev/enbd0 10809 disk --channels 2 --tls --ca "$CERTS/ca-cert.pem" --retry-max 1
old=$(cat /run/enbd/enbd0.pid)
# About 190 MiB moved: at a few MB/s of TLS under TCG, it outlasts both
# faults (checked below).
fio_verify_start /dev/enbd0 96
sleep 6
# Whether the pid file names a live enbd-client other than the killed one
# (the file may be missing or stale for a moment while the guardian acts).
new_helper_up() {
	local p
	p=$(cat /run/enbd/enbd0.pid 2>/dev/null) || return 1
	[ -n "$p" ] && [ "$p" != "$old" ] &&
		[ "$(cat "/proc/$p/comm" 2>/dev/null)" = enbd-client ] &&
		! grep -q '^State:[[:space:]]*Z' "/proc/$p/status" 2>/dev/null
}
run kill -9 "$old"
wait_for 10 new_helper_up || fail "helper not restarted: no new live enbd-client in /run/enbd/enbd0.pid"
echo "helper $old killed, guardian started $(cat /run/enbd/enbd0.pid)"
sleep 2
ports=($(channel_ports 10809))
kill_conn 10809 "${ports[0]}"
fio_still_running "the connection reset"
# request_timeout 5 s + 1 s: kernel TLS carries on; the reset channel's
# requests go to the other at once.
fio_verify_finish 300 6000
[ "$(channels_started)" -ge 3 ] || fail "the restarted helper did not reconnect"
expect_eq "$(grep -c '^enbd0 channel .*tls=ktls' /proc/nbdinfo)" 2 "channels with kernel TLS"
run "$CLIENT" disconnect /dev/enbd0
