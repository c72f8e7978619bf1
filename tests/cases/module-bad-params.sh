# bad module parameters are refused at insmod with a clear message
# timeout: 60
check_bad() {
	local arg=$1 msg=$2
	must_fail "" insmod "$KO" "$arg"
	grep -q '^enbd ' /proc/modules && fail "enbd loaded with $arg"
	dmesg | tail -n 5 | grep -qF "$msg" || fail "no '$msg' in the kernel log for $arg"
}
check_bad nr_devices=0 "nr_devices=0 is out of range 1..256"
check_bad nr_devices=257 "nr_devices=257 is out of range 1..256"
check_bad queue_depth=5000 "queue_depth=5000 is out of range 1..1024"
check_bad max_channels=-1 "max_channels=-1 is out of range 1..64"
check_bad request_timeout=abc "request_timeout=abc is not an integer"
check_bad max_sectors_kb=1 "max_sectors_kb=1 is out of range 4..32768"
# A good load still works afterwards.
load_enbd nr_devices=1
unload_enbd
