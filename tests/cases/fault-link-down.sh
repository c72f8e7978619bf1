# the link to the server goes down for 10 s (veth in a netns), request_timeout 4 s < 10 s < dead_timeout: no error
# timeout: 480
load_enbd request_timeout=4 keepalive_interval=2 dead_timeout=60
setup_netns
make_backing /tmp/disk.img 256
start_server_ns 10809 disk=/tmp/disk.img
run "$CLIENT" connect /dev/enbd0 10.99.0.2:10809 --export disk --channels 2 --timeout 3 --retry-max 1 --log /tmp/enbd-client-enbd0.log
fio_verify_start /dev/enbd0
sleep 8
t0=$(date +%s%3N)
run ip link set veth-c down
sleep 10
run ip link set veth-c up
outage=$(($(date +%s%3N) - t0))
wait_for 60 channels_are enbd0 2 || fail "channels not back after the link returned"
# The outage, then request_timeout (4 s) + 1 s to notice, reconnect and resend.
echo "link down for $outage ms"
fio_verify_finish 300 $((outage + 5000))
[ "$(channels_started)" -ge 4 ] || fail "no channel was reconnected"
cat /tmp/enbd-client-enbd0.log | tail -n 20
grep '^enbd0' /proc/nbdinfo
run "$CLIENT" disconnect /dev/enbd0
