# TLS interop: enbd-client with nbdkit --tls=require and qemu-nbd --tls-creds; Linux nbd-client with TLS against enbd-server
# timeout: 420
load_enbd
make_certs
make_backing /tmp/k.img 64
make_backing /tmp/q.img 64
make_backing /tmp/s.img 64
nbdkit -i 127.0.0.1 -p 10811 --tls=require --tls-certificates="$CERTS" file /tmp/k.img || fail "nbdkit failed"
qemu-nbd --fork --persistent -f raw -x disk -b 127.0.0.1 -p 10812 -e 4 \
	--object "tls-creds-x509,id=tls0,dir=$CERTS,endpoint=server" --tls-creds tls0 /tmp/q.img || fail "qemu-nbd failed"
wait_port 10811
wait_port 10812
connect_enbd /dev/enbd0 10811 "" --tls --ca "$CERTS/ca-cert.pem" --channels 2
sum=$(write_random /dev/enbd0 32)
echo 3 >/proc/sys/vm/drop_caches
expect_eq "$(md5_of /dev/enbd0 32)" "$sum" "read back over TLS from nbdkit"
grep -q '^enbd0 channel .*tls=ktls' /proc/nbdinfo || fail "nbdkit channel not on kernel TLS"
run "$CLIENT" disconnect /dev/enbd0
expect_eq "$(md5_of /tmp/k.img 32)" "$sum" "nbdkit file contents"
# qemu-nbd verifies client certificates by default (verify-peer=on): mutual TLS.
connect_enbd /dev/enbd1 10812 disk --tls --ca "$CERTS/ca-cert.pem" --cert "$CERTS/client-cert.pem" --key "$CERTS/client-key.pem"
sum=$(write_random /dev/enbd1 32)
echo 3 >/proc/sys/vm/drop_caches
expect_eq "$(md5_of /dev/enbd1 32)" "$sum" "read back over TLS from qemu-nbd"
run "$CLIENT" disconnect /dev/enbd1
expect_eq "$(md5_of /tmp/q.img 32)" "$sum" "qemu-nbd image contents"
# Linux nbd-client (GnuTLS proxy) against enbd-server.
start_tls_server 10813 --tls-client-ca "$CERTS/ca-cert.pem" --export disk=/tmp/s.img
run modprobe nbd nbds_max=2
run nbd-client 127.0.0.1 10813 /dev/nbd0 -N disk -b 4096 -certfile "$CERTS/client-cert.pem" \
	-keyfile "$CERTS/client-key.pem" -cacertfile "$CERTS/ca-cert.pem" -tlshostname localhost
sum=$(write_random /dev/nbd0 32)
echo 3 >/proc/sys/vm/drop_caches
expect_eq "$(md5_of /dev/nbd0 32)" "$sum" "read back through nbd-client TLS"
run nbd-client -d /dev/nbd0
expect_eq "$(md5_of /tmp/s.img 32)" "$sum" "enbd-server file after nbd-client TLS"
run rmmod nbd
