# the userspace TLS proxy (what runs when kTLS is missing) works, shows tls=proxy, and dies with its helper
# timeout: 420
load_enbd request_timeout=5 dead_timeout=120
make_certs
make_backing /tmp/disk.img 256
start_tls_server 10809 --export disk=/tmp/disk.img
connect_enbd /dev/enbd0 10809 disk --channels 2 --tls --ca "$CERTS/ca-cert.pem" --tls-fallback always-proxy --retry-max 1
wait_for 20 channels_are enbd0 2 || fail "proxy channels not up"
expect_eq "$(grep -c '^enbd0 channel .*tls=proxy' /proc/nbdinfo)" 2 "channels through the proxy"
grep -q 'userspace proxy' /tmp/enbd-client-enbd0.log || fail "no warning about the proxy in the helper log"
# About 190 MiB moved: at a few MB/s of TLS under TCG, it outlasts the
# helper kill (checked below).
fio_verify_start /dev/enbd0 96
sleep 5
# Unlike kernel TLS, killing the helper kills its proxies and their channels;
# the guardian's new helper reconnects, so I/O still ends without errors.
run kill -9 "$(cat /run/enbd/enbd0.pid)"
fio_still_running "the helper kill"
# request_timeout 5 s + 1 s: the guardian's new helper reconnects through new proxies.
fio_verify_finish 300 6000
[ "$(channels_started)" -ge 4 ] || fail "proxy channels not re-established"
run "$CLIENT" disconnect /dev/enbd0
