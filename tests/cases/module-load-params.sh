# insmod with parameters; runtime parameters change through sysfs
# timeout: 60
load_enbd nr_devices=2 max_channels=3 queue_depth=16 request_timeout=7 dead_timeout=40 keepalive_interval=0 max_sectors_kb=256
[ -b /dev/enbd0 ] && [ -b /dev/enbd1 ] || fail "devices missing"
[ ! -e /dev/enbd2 ] || fail "/dev/enbd2 exists with nr_devices=2"
head -n1 /proc/nbdinfo
grep -q '^# enbd .* nr_devices=2 max_channels=3 queue_depth=16 max_sectors_kb=256 request_timeout=7 dead_timeout=40 keepalive_interval=0' /proc/nbdinfo \
	|| fail "header does not show the parameters"
expect_eq "$(cat /sys/block/enbd0/mq/0/nr_tags)" 16 "driver tags follow queue_depth"
expect_eq "$(cat /sys/block/enbd0/queue/max_hw_sectors_kb)" 256 "max_hw_sectors_kb"
# Runtime-writable parameters take effect and are range-checked.
echo 12 >/sys/module/enbd/parameters/request_timeout || fail "cannot set request_timeout"
grep -q 'request_timeout=12' /proc/nbdinfo || fail "request_timeout change not visible"
must_fail "" sh -c 'echo 0 >/sys/module/enbd/parameters/request_timeout'
must_fail "" sh -c 'echo 5 >/sys/module/enbd/parameters/nr_devices'
expect_eq "$(cat /sys/module/enbd/parameters/request_timeout)" 12 "request_timeout after bad write"
unload_enbd
