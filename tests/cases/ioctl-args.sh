# invalid ioctl arguments get EINVAL, a wrong token EACCES, a non-socket EINVAL; IOC_SERVERS checks its count, active index and states
# timeout: 120
load_enbd nr_devices=1
IO="python3 $ENBD_ROOT/tests/tools/enbd_ioctl.py /dev/enbd0"
expect_eq "$($IO configure 1048576 1000)" "errno EINVAL" "odd block size"
expect_eq "$($IO configure 1048576 8192)" "errno EINVAL" "block size above 4096"
expect_eq "$($IO configure 1000 512)" "errno EINVAL" "size not a multiple of the block size"
expect_eq "$($IO configure 1048576 512 1 7)" "errno EINVAL" "reserved field"
expect_eq "$($IO configure 1048576 512 0x10000)" "errno EINVAL" "flags beyond 16 bits"
expect_eq "$($IO raw 0xEB7F)" "errno ENOTTY" "unknown ioctl"
out=$($IO configure 1048576 4096)
token=${out#ok token }
[ "${#token}" = 32 ] || fail "no token: $out"
expect_eq "$($IO configure 1048576 4096)" "errno EBUSY" "configure twice"
make_backing /tmp/disk.img 16
start_server 10809 disk=/tmp/disk.img
expect_eq "$($IO add-sock tcp:127.0.0.1:10809 00000000000000000000000000000000)" "errno EACCES" "wrong token"
grep -q 'token_rejects=1' /proc/nbdinfo || fail "token reject not counted"
expect_eq "$($IO add-sock file:/tmp/disk.img "$token")" "errno ENOTSOCK" "a file is not a socket"
expect_eq "$($IO add-sock tcp:127.0.0.1:10809 "$token" 8)" "errno EINVAL" "server index 8"
expect_eq "$($IO add-sock tcp:127.0.0.1:10809 "$token" 4294967295)" "errno EINVAL" "server index 2^32-1"
expect_eq "$($IO servers "$token" 0 0)" "errno EINVAL" "no servers"
expect_eq "$($IO servers "$token" 9 0)" "errno EINVAL" "9 servers"
expect_eq "$($IO servers "$token" 3 3)" "errno EINVAL" "active server past the count"
expect_eq "$($IO servers "$token" 3 0 3)" "errno EINVAL" "unknown server state"
expect_eq "$($IO servers 00000000000000000000000000000000 3 0)" "errno EACCES" "servers with a wrong token"
expect_eq "$($IO servers "$token" 3 0xffffffff)" "ok" "no active server"
expect_eq "$($IO servers "$token" 3 1)" "ok" "server 1 active"
grep '^enbd0 server' /proc/nbdinfo
expect_eq "$(grep -c '^enbd0 server ' /proc/nbdinfo)" 3 "server lines"
expect_eq "$(active_server enbd0)" 1 "active server shown"
run "$CLIENT" eject /dev/enbd0
expect_eq "$(proc_field enbd0 state)" unconfigured "state after eject"
