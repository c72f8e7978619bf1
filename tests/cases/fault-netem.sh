# 5 ms delay and 0.5% loss each way (tc netem) under verified I/O: slower, but no error
# timeout: 600
load_enbd request_timeout=10 dead_timeout=60
setup_netns
run tc qdisc add dev veth-c root netem delay 5ms loss 0.5%
run ip netns exec srv tc qdisc add dev veth-s root netem delay 5ms loss 0.5%
make_backing /tmp/disk.img 256
start_server_ns 10809 disk=/tmp/disk.img
run "$CLIENT" connect /dev/enbd0 10.99.0.2:10809 --export disk --channels 2 --retry-max 1 --log /tmp/enbd-client-enbd0.log
# 256 MiB moved in 64 KiB requests: thousands of segments, so 0.5% loss
# hits many of them.
fio_verify_start /dev/enbd0 128
# A lost segment is retransmitted well within request_timeout (10 s) + 1 s.
fio_verify_finish 540 11000
grep '^enbd0' /proc/nbdinfo
run "$CLIENT" disconnect /dev/enbd0
