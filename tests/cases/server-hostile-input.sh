# enbd-server answers malformed and hostile clients with errors or a close, never a crash
# timeout: 120
make_backing /tmp/disk.img 16
start_server 10809 disk=/tmp/disk.img ro=/tmp/disk.img,ro,shared
for t in bad-option-magic unknown-option huge-option read-out-of-range read-oversize \
	unknown-command bad-request-magic write-oversize; do
	run timeout 30 python3 "$ENBD_ROOT/tests/tools/nbdprobe.py" 127.0.0.1 10809 disk "$t"
done
run timeout 30 python3 "$ENBD_ROOT/tests/tools/nbdprobe.py" 127.0.0.1 10809 ro write-readonly
kill -0 "$SERVER_PID" || fail "server died"
# Still serving normally after all that.
run nbdinfo nbd://127.0.0.1:10809/disk >/dev/null
# Start-up errors are clear.
must_fail "cannot open /nonexistent" "$SERVER" --export x=/nonexistent --listen 127.0.0.1:10899
must_fail "neither a regular file nor a block device" "$SERVER" --export x=/tmp --listen 127.0.0.1:10899
must_fail "unknown export option" "$SERVER" --export x=/tmp/disk.img,bogus
# The image this case's server has open is locked against a second writer
# (a reader too); ',shared' lets the next checks reach what they test.
must_fail "in use: another process .* holds a write lock.*,shared" "$SERVER" --export x=/tmp/disk.img --listen 127.0.0.1:10899
must_fail "in use" "$SERVER" --export x=/tmp/disk.img,ro --listen 127.0.0.1:10899
must_fail "given twice" "$SERVER" --export x=/tmp/disk.img,shared --export x=/tmp/disk.img,shared --listen 127.0.0.1:10899
must_fail "cannot listen" "$SERVER" --export x=/tmp/disk.img,shared --listen 127.0.0.1:10809
