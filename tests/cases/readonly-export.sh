# a read-only export gives a read-only device; writes are refused, reads work
# timeout: 120
load_enbd
make_backing /tmp/disk.img 16
sum=$(write_random /tmp/disk.img 8)
start_server 10809 ro=/tmp/disk.img,ro
connect_enbd /dev/enbd0 10809 ro
expect_eq "$(blockdev --getro /dev/enbd0)" 1 "read-only flag"
grep '^enbd0 ' /proc/nbdinfo | grep -q 'flags=ro' || fail "/proc lacks ro flag"
must_fail "" dd if=/dev/zero of=/dev/enbd0 bs=4096 count=1 oflag=direct
expect_eq "$(md5_of /dev/enbd0 8)" "$sum" "reads from a read-only export"
run "$CLIENT" disconnect /dev/enbd0
expect_eq "$(blockdev --getro /dev/enbd0)" 0 "read-only flag cleared"
