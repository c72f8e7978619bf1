# a TLS close_notify on a kernel-TLS channel (server shutting down) drops the channel, nothing is misread, I/O resumes
# timeout: 420
load_enbd request_timeout=5 dead_timeout=120
make_certs
make_backing /tmp/disk.img 256
start_tls_server 10809 --export disk=/tmp/disk.img
connect_enbd /dev/enbd0 10809 disk --channels 2 --tls --ca "$CERTS/ca-cert.pem" --retry-max 1
# About 190 MiB moved: at a few MB/s of TLS under TCG, it outlasts the
# outage (checked below).
fio_verify_start /dev/enbd0 96
sleep 6
# SIGTERM: the server sends close_notify on every TLS connection, then exits.
t0=$(date +%s%3N)
run kill -TERM "$SERVER_PID"
wait "$SERVER_PID" 2>/dev/null
grep -i close_notify /tmp/enbd-server-10809.log || fail "server did not report sending close_notify"
close_notify_logged() {
	case_log | grep -q 'dropped: TLS alert or close_notify'
}
wait_for 10 close_notify_logged || fail "kernel did not report the close_notify"
start_tls_server 10809 --export disk=/tmp/disk.img
outage=$(($(date +%s%3N) - t0))
echo "server down for $outage ms"
fio_still_running "the server came back"
# The outage, then request_timeout (5 s) + 1 s to reconnect and resend.
fio_verify_finish 300 $((outage + 6000))
[ "$(channels_started)" -ge 4 ] || fail "channels not reconnected"
run "$CLIENT" disconnect /dev/enbd0
