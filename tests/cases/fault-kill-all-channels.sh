# all channels are reset at once under verified I/O: requests wait, the helper reconnects, nothing is lost
# timeout: 420
load_enbd request_timeout=5 dead_timeout=120
make_backing /tmp/disk.img 256
start_server 10809 disk=/tmp/disk.img
connect_enbd /dev/enbd0 10809 disk --channels 4 --retry-max 1
fio_verify_start /dev/enbd0
sleep 8
run ss -K state established "( dport = :10809 )"
wait_for 30 channels_are enbd0 4 || fail "channels not reconnected"
fio_verify_finish
[ "$(channels_started)" -ge 8 ] || fail "channels were not all replaced ($(channels_started) started)"
tag_field enbd0 stats resubmits
run "$CLIENT" disconnect /dev/enbd0
