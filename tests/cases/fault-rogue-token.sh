# a socket handed in with a wrong token during I/O gets EACCES, is counted, and disturbs nothing
# timeout: 300
load_enbd
make_backing /tmp/disk.img 256
start_server 10809 disk=/tmp/disk.img
connect_enbd /dev/enbd0 10809 disk --channels 2
fio_verify_start /dev/enbd0 256
for i in 1 2 3; do
	expect_eq "$(python3 "$ENBD_ROOT/tests/tools/enbd_ioctl.py" /dev/enbd0 add-sock tcp:127.0.0.1:10809 0123456789abcdef0123456789abcdef)" \
		"errno EACCES" "rogue handoff $i"
done
expect_eq "$(tag_field enbd0 stats token_rejects)" 3 "token_rejects"
expect_eq "$(proc_field enbd0 channels)" 2 "channels"
# Rogue handoffs must not disturb the channels: no request may even age
# (request_timeout, 30 s by default).
fio_verify_finish 300 30000
run "$CLIENT" disconnect /dev/enbd0
