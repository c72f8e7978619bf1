# insmod with default parameters creates four empty /dev/enbdN
# timeout: 60
load_enbd
for i in 0 1 2 3; do
	[ -b /dev/enbd$i ] || fail "/dev/enbd$i missing"
	expect_eq "$(blockdev --getsize64 /dev/enbd$i)" 0 "size of /dev/enbd$i"
	expect_eq "$(proc_field enbd$i state)" unconfigured "enbd$i state"
done
[ ! -e /dev/enbd4 ] || fail "/dev/enbd4 exists with nr_devices=4"
expect_eq "$(cat /sys/module/enbd/parameters/nr_devices)" 4 nr_devices
expect_eq "$(cat /sys/module/enbd/parameters/queue_depth)" 128 queue_depth
expect_eq "$(cat /sys/module/enbd/parameters/max_channels)" 8 max_channels
expect_eq "$(cat /sys/module/enbd/parameters/request_timeout)" 30 request_timeout
expect_eq "$(cat /sys/module/enbd/parameters/dead_timeout)" 0 dead_timeout
# An unconfigured device has no blocks: a read ends at once at EOF.
dd if=/dev/enbd0 of=/dev/null bs=4096 count=1 iflag=direct 2>&1 | grep -q '^0+0 records in' || fail "read of an empty device"
case_log | grep -q 'enbd 0.1.0: 4 devices' || fail "no load message in this case's kernel log"
unload_enbd
[ ! -e /dev/enbd0 ] || fail "/dev/enbd0 still there after rmmod"
[ ! -e /proc/nbdinfo ] || fail "/proc/nbdinfo still there after rmmod"
