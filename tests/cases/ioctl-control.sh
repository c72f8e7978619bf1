# the ioctl control path: errors for unconfigured devices and non-root callers
# timeout: 60
load_enbd nr_devices=1
must_fail "not connected" "$CLIENT" disconnect /dev/enbd0
must_fail "not connected" "$CLIENT" eject /dev/enbd0
must_fail "cannot open" "$CLIENT" disconnect /dev/enbd9
must_fail "not an enbd device" "$CLIENT" disconnect /dev/null
# A non-root user who may open the node is still refused with EPERM.
chmod 666 /dev/enbd0
must_fail "needs root" setpriv --reuid=65534 --regid=65534 --clear-groups "$CLIENT" disconnect /dev/enbd0
unload_enbd
