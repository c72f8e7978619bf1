# enbd-client fails clearly on a wrong export, refused connection, bad arguments and servers that disagree on the export, at connect and at reconnect
# timeout: 150
load_enbd nr_devices=2
make_backing /tmp/disk.img 16
start_server 10809 disk=/tmp/disk.img
must_fail "refused export 'nope': no such export" "$CLIENT" connect /dev/enbd0 127.0.0.1:10809 --export nope
must_fail "cannot connect to 127.0.0.1:10999" "$CLIENT" connect /dev/enbd0 127.0.0.1:10999 --export disk
must_fail "bad port" "$CLIENT" connect /dev/enbd0 host:port --export disk
must_fail "channels must be at least 1" "$CLIENT" connect /dev/enbd0 127.0.0.1:10809 --export disk --channels 0
must_fail "not an enbd device" "$CLIENT" connect /dev/null 127.0.0.1:10809 --export disk
# Servers of one device must offer one export: another size is refused.
first=$SERVER_PID
make_backing /tmp/other.img 32
start_server 10810 disk=/tmp/other.img
other=$SERVER_PID
must_fail "127.0.0.1:10810 offers export 'disk' with a different size or flags than 127.0.0.1:10809" \
	"$CLIENT" connect /dev/enbd0 127.0.0.1:10809 127.0.0.1:10810 --export disk --shared-backend
expect_eq "$(proc_field enbd0 state)" unconfigured "state after failed connects"
connect_enbd /dev/enbd0 10809 disk --retry-max 1
must_fail "already connected" "$CLIENT" connect /dev/enbd0 127.0.0.1:10809 --export disk
"$CLIENT" --help | grep -q "connect" || fail "--help lacks connect"
"$CLIENT" connect --help | grep -q -- "--channels" || fail "connect --help lacks --channels"
# A server that comes back with another size gets no channel: the device
# keeps its size and the helper retries, saying why.
run kill "$first" "$other"
wait "$first" "$other" 2>/dev/null
start_server 10809 disk=/tmp/other.img
wait_for 20 grep -q "127.0.0.1:10809 now offers export 'disk' with size 33554432 flags 0x[0-9a-f]*, not 16777216" \
	/tmp/enbd-client-enbd0.log || fail "the helper did not refuse the changed export"
expect_eq "$(proc_field enbd0 channels)" 0 "channels to the changed export"
expect_eq "$(blockdev --getsize64 /dev/enbd0)" 16777216 "size after the refused reconnect"
run "$CLIENT" disconnect /dev/enbd0
