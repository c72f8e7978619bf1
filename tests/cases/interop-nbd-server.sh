# enbd as the client of Debian's nbd-server
# timeout: 180
load_enbd
make_backing /tmp/n.img 64
cat >/tmp/nbd-server.conf <<CONF
[generic]
port = 10813
listenaddr = 127.0.0.1
allowlist = true
[disk]
exportname = /tmp/n.img
CONF
run nbd-server -C /tmp/nbd-server.conf
wait_port 10813
# Once in a full run (2026-11-25) nbd-server sent no greeting within the
# helper's 30 s timeout, and the case passed alone; not yet explained. Show
# the server's state when that happens, then try once more.
if ! "$CLIENT" list 127.0.0.1:10813 >/tmp/list.out; then
	echo "list failed; nbd-server state:"
	ps -eo pid,stat,wchan:20,cmd | grep '[n]bd-server'
	ss -tnp state all '( sport = :10813 or dport = :10813 )'
	"$CLIENT" list 127.0.0.1:10813 >/tmp/list.out || fail "enbd-client list failed twice"
fi
grep -qx disk /tmp/list.out || fail "export list lacks disk"
connect_enbd /dev/enbd0 10813 disk
sum=$(write_random /dev/enbd0 32)
echo 3 >/proc/sys/vm/drop_caches
expect_eq "$(md5_of /dev/enbd0 32)" "$sum" "read back"
run "$CLIENT" disconnect /dev/enbd0
expect_eq "$(md5_of /tmp/n.img 32)" "$sum" "export file contents"
