# enbd as the client of qemu-nbd: data written through /dev/enbd0 lands in the image and reads back
# timeout: 180
load_enbd
make_backing /tmp/q.img 64
qemu-nbd --fork --persistent -f raw -x disk -b 127.0.0.1 -p 10810 -e 4 /tmp/q.img || fail "qemu-nbd failed"
wait_port 10810
connect_enbd /dev/enbd0 10810 disk --channels 2
sum=$(write_random /dev/enbd0 32)
echo 3 >/proc/sys/vm/drop_caches
expect_eq "$(md5_of /dev/enbd0 32)" "$sum" "read back through enbd"
run "$CLIENT" disconnect /dev/enbd0
expect_eq "$(md5_of /tmp/q.img 32)" "$sum" "image contents"
