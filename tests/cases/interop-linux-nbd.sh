# Linux's nbd driver and libnbd's tools against enbd-server
# timeout: 180
make_backing /tmp/s.img 64
start_server 10809 disk=/tmp/s.img
run modprobe nbd nbds_max=2
run nbd-client 127.0.0.1 10809 /dev/nbd0 -N disk -b 4096
sum=$(write_random /dev/nbd0 32)
echo 3 >/proc/sys/vm/drop_caches
expect_eq "$(md5_of /dev/nbd0 32)" "$sum" "read back through Linux nbd"
run nbd-client -d /dev/nbd0
expect_eq "$(md5_of /tmp/s.img 32)" "$sum" "backing file after Linux nbd"
# libnbd: inspect and copy both ways.
run nbdinfo nbd://127.0.0.1:10809/disk | grep -q 'export-size: 67108864' || fail "nbdinfo size"
head -c 16M /dev/urandom >/tmp/in.bin
run nbdcopy /tmp/in.bin nbd://127.0.0.1:10809/disk
run nbdcopy nbd://127.0.0.1:10809/disk /tmp/out.bin
expect_eq "$(head -c 16M /tmp/out.bin | md5sum)" "$(md5sum </tmp/in.bin)" "nbdcopy round trip"
run rmmod nbd
