# two qemu-nbd rbd: gateways in front of one Ceph RBD image (a one-node cluster in the VM): in shared-backend mode enbd fails over from the active gateway, killed with -9, to the other during fio verify, with 0 errors; Ceph fences the dead one
# timeout: 900
# The surviving gateway's first write waits until the dead one's watch on
# the image expires (osd_client_watch_timeout, 10 s here), then breaks the
# exclusive lock and blocklists the dead client, so a write the dead
# gateway had taken can never land later (write fencing by the backend).
CEPH="bash $ENBD_ROOT/tests/tools/ceph-single.sh"
export CEPH_SINGLE_IMG_SIZE=128M CEPH_SINGLE_WATCH_TIMEOUT=10 CEPH_SINGLE_TIMEOUT=900
trap '$CEPH down /tmp/ceph >/dev/null 2>&1' EXIT
load_enbd request_timeout=30
t0=$SECONDS
run $CEPH up /tmp/ceph 127.0.0.1
echo "ceph up after $((SECONDS - t0)) s"
run $CEPH gateway /tmp/ceph 10811 127.0.0.1
run $CEPH gateway /tmp/ceph 10812 127.0.0.1
ps -o rss=,comm= -C ceph-mon,ceph-mgr,ceph-osd,qemu-nbd
must_fail "writable.*--shared-backend" "$CLIENT" connect /dev/enbd0 127.0.0.1:10811 127.0.0.1:10812 --export img --foreground
run "$CLIENT" connect /dev/enbd0 127.0.0.1:10811 127.0.0.1:10812 --export img --shared-backend \
	--channels 2 --probe-max 4 --log /tmp/enbd-client-enbd0.log
wait_for 60 sh -c 'grep "^enbd0 server " /proc/nbdinfo | grep -q role=active' ||
	fail "no gateway was chosen: $(grep '^enbd0 server' /proc/nbdinfo)"
grep '^enbd0' /proc/nbdinfo
active=$(active_server enbd0)
other=$((1 - active))
fio_verify_start_at /dev/enbd0 0 96 192
wait_for 120 sh -c "[ \$(grep '^enbd0 server id=$active ' /proc/nbdinfo | tr ' ' '\n' | sed -n 's/^bytes=//p') -ge 16777216 ]" ||
	fail "no I/O reached gateway $active"
r0=$(tag_field enbd0 stats resubmits)
run $CEPH gw-stop /tmp/ceph $((10811 + active)) KILL
fio_still_running "the gateway was killed"
wait_for 120 sh -c "grep '^enbd0 server ' /proc/nbdinfo | grep -q 'id=$other .*role=active'" ||
	fail "the I/O did not move to gateway $other: $(grep '^enbd0 server' /proc/nbdinfo)"
# The stall is the watch timeout, within request_timeout (30 s) + 1 s.
fio_verify_finish 1200 31000
grep '^enbd0' /proc/nbdinfo
r1=$(tag_field enbd0 stats resubmits)
echo "resubmitted when gateway $active died: $((r1 - r0))"
[ $((r1 - r0)) -gt 0 ] || fail "nothing was in flight on the killed gateway"
bl=$(timeout 120 ceph --conf /tmp/ceph/ceph.conf osd blocklist ls 2>&1)
echo "$bl"
grep -q '127.0.0.1' <<<"$bl" || fail "Ceph did not blocklist the dead gateway"
expect_eq "$(tag_field enbd0 stats errors)" 0 "I/O errors"
run "$CLIENT" disconnect /dev/enbd0
