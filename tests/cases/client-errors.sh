# enbd-client fails clearly on a wrong export, refused connection and bad arguments
# timeout: 120
load_enbd nr_devices=2
make_backing /tmp/disk.img 16
start_server 10809 disk=/tmp/disk.img
must_fail "refused export 'nope': no such export" "$CLIENT" connect /dev/enbd0 127.0.0.1:10809 --export nope
must_fail "cannot connect to 127.0.0.1:10999" "$CLIENT" connect /dev/enbd0 127.0.0.1:10999 --export disk
must_fail "bad port" "$CLIENT" connect /dev/enbd0 host:port --export disk
must_fail "channels must be at least 1" "$CLIENT" connect /dev/enbd0 127.0.0.1:10809 --export disk --channels 0
must_fail "not an enbd device" "$CLIENT" connect /dev/null 127.0.0.1:10809 --export disk
expect_eq "$(proc_field enbd0 state)" unconfigured "state after failed connects"
connect_enbd /dev/enbd0 10809 disk
must_fail "already connected" "$CLIENT" connect /dev/enbd0 127.0.0.1:10809 --export disk
"$CLIENT" --help | grep -q "connect" || fail "--help lacks connect"
"$CLIENT" connect --help | grep -q -- "--channels" || fail "connect --help lacks --channels"
run "$CLIENT" disconnect /dev/enbd0
