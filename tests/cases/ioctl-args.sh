# invalid ioctl arguments get EINVAL, a wrong token EACCES, a non-socket EINVAL
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
run "$CLIENT" eject /dev/enbd0
expect_eq "$(proc_field enbd0 state)" unconfigured "state after eject"
