# one of 4 channels is reset under verified I/O: its requests move to the others, the helper replaces it, nothing is lost
# timeout: 420
load_enbd request_timeout=5 dead_timeout=120
make_backing /tmp/disk.img 256
start_server 10809 disk=/tmp/disk.img
connect_enbd /dev/enbd0 10809 disk --channels 4 --retry-max 1
fio_verify_start /dev/enbd0
sleep 8
ports=($(channel_ports 10809))
[ "${#ports[@]}" = 4 ] || fail "expected 4 connections, found ${#ports[@]}"
kill_conn 10809 "${ports[0]}"
wait_for 30 channels_are enbd0 4 || fail "channel not replaced"
grep '^enbd0 ' /proc/nbdinfo
fio_verify_finish
grep -q 'channel 0 dropped\|channel [0-9] dropped' <(dmesg) || fail "no channel was dropped"
[ "$(channels_started)" -ge 5 ] || fail "the reset channel was not replaced ($(channels_started) channels started)"
grep '^enbd0 stats' /proc/nbdinfo
run "$CLIENT" disconnect /dev/enbd0
