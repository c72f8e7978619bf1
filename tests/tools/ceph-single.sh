#!/usr/bin/env bash
# ceph-single.sh -- throw-away single-node Ceph cluster (1 mon, 1 mgr, 1
# memstore OSD) plus qemu-nbd gateways exporting ONE RBD image, for NBD
# client fail-over tests.
#
# Needs (Debian 12): ceph-mon ceph-mgr ceph-osd ceph-common qemu-utils
# qemu-block-extra (rbd driver); nbdinfo (libnbd-bin) optional.
#   apt-get install -y --no-install-recommends ceph-mon ceph-mgr ceph-osd ceph-common
#
# Usage:
#   ceph-single.sh up DIR [IP]          create + start cluster, pool rbd, image img
#   ceph-single.sh gateway DIR PORT [IP] start qemu-nbd on IP:PORT, export "img"
#   ceph-single.sh gw-stop DIR PORT [SIG] stop that gateway (default SIGTERM; KILL = crash)
#   ceph-single.sh status DIR           ceph -s
#   ceph-single.sh down DIR             kill everything started from DIR, rm -rf DIR
#   ceph-single.sh env DIR              print "export CEPH_CONF=..." for ceph/rbd CLI use
#
# Environment knobs (all optional):
#   CEPH_SINGLE_IMG_SIZE   image size (default 256M)
#   CEPH_SINGLE_FEATURES   rbd image features (default "layering,exclusive-lock";
#                          "layering" = no lock at all, the two gateways then
#                          write concurrently without any coordination)
#   CEPH_SINGLE_STORE      memstore (default; data in OSD RAM) or bluestore (file)
#   CEPH_SINGLE_MEM_BYTES  memstore capacity (default 512M; data lives in OSD RAM)
#   CEPH_SINGLE_DISK_BYTES bluestore file size (default 1G, sparse)
#   CEPH_SINGLE_TIMEOUT    bound in s for each wait (mon, mgr, osd, health, gw; default 300)
#   CEPH_SINGLE_WATCH_TIMEOUT  osd_client_watch_timeout in s (default 10): bounds
#                          how long a dead gateway keeps the exclusive lock
#   CEPH_SINGLE_MON_PORT   msgr2 port of the mon (default 3300; v1 = port+1)
#   CEPH_SINGLE_NICE       nice level for daemons and gateways (default 0)
#   CEPH_SINGLE_MGR_LEAN   1 (default): mgr loads no python modules (~60 MB RSS
#                          instead of ~300 MB); 0: stock always-on modules
#
# Everything (conf, mon/osd/mgr data, pid files, sockets, logs) lives under DIR;
# /etc/ceph and /var/lib/ceph are not used.  Auth is "none" (no keyrings needed
# by clients).  All sockets are on IP (default 127.0.0.1): mon 3300+3301, OSD
# and mgr in 6800-7300, gateways on the given PORTs.  `ceph -c DIR/ceph.conf`
# and `rbd -c DIR/ceph.conf` talk to the cluster.
#
# Gateways: qemu-nbd --cache=none (librbd cache off), so a write acked by one
# gateway is visible through the other at once.  With exclusive-lock (default
# features) the lock moves between live gateways on demand (~0.1 s).  If the
# holder dies (kill -9) or freezes (SIGSTOP), the other gateway's next write
# stalls until the dead one's watch expires (osd_client_watch_timeout, here
# CEPH_SINGLE_WATCH_TIMEOUT), then breaks the lock and blocklists the old
# client: a frozen gateway that resumes fails every request (ESHUTDOWN on
# write, EIO on read) until it is restarted -- i.e. it is fenced.
set -euo pipefail

PROG=${0##*/}
CLEANUP_HINT=""
die() { echo "$PROG: error: $*${CLEANUP_HINT:+ ($CLEANUP_HINT)}" >&2; exit 1; }
log() { echo "$PROG: [+${SECONDS}s] $*" >&2; }

usage() {
    sed -n '/^# Usage:/,/^# Environment/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}

need() { command -v "$1" >/dev/null 2>&1 || die "'$1' not found (install: $2)"; }

absdir() { mkdir -p "$1" && (cd "$1" && pwd); }

NICE=${CEPH_SINGLE_NICE:-0}
TMO=${CEPH_SINGLE_TIMEOUT:-300}
run_nice() { if [ "$NICE" != 0 ]; then nice -n "$NICE" "$@"; else "$@"; fi; }

# ceph/rbd CLI against DIR's cluster, bounded in time
cephc() { timeout 60 ceph --conf "$D/ceph.conf" --connect-timeout 30 "$@"; }
rbdc()  { timeout 120 rbd --conf "$D/ceph.conf" "$@"; }

# running (a zombie awaiting its reaper counts as dead)
alive() {
    local st
    st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}
pid_alive() { [ -f "$1" ] && alive "$(cat "$1")"; }

# wait_for SECONDS DESCRIPTION CMD...: poll CMD every second until it succeeds
wait_for() {
    local secs=$1 what=$2 t0=$SECONDS; shift 2
    until "$@" >/dev/null 2>&1; do
        if (( SECONDS - t0 >= secs )); then
            log "timed out after ${secs}s waiting for: $what"
            return 1
        fi
        sleep 1
    done
    log "ok after $((SECONDS - t0))s: $what"
}

# health check via JSON: OSD up+in and every PG active+clean
healthy() {
    cephc status -f json 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
om = s["osdmap"]; om = om.get("osdmap", om)
pm = s["pgmap"]
ok = (s["health"]["status"] in ("HEALTH_OK", "HEALTH_WARN")
      and om["num_osds"] >= 1 and om["num_up_osds"] == om["num_osds"]
      and om["num_in_osds"] == om["num_osds"]
      and pm.get("num_pgs", 0) > 0
      and all(st["state_name"] == "active+clean" for st in pm.get("pgs_by_state", []))
      and sum(st["count"] for st in pm.get("pgs_by_state", [])) == pm["num_pgs"])
sys.exit(0 if ok else 1)'
}

dump_logs() {
    log "--- ceph -s ---"; cephc -s >&2 || true
    for f in "$D"/log/*.log; do
        [ -f "$f" ] || continue
        log "--- tail $f ---"; tail -n 20 "$f" >&2
    done
}

cmd_up() {
    [ $# -ge 1 ] || usage
    local ip=${2:-127.0.0.1}
    [ -e "$1" ] && [ -n "$(ls -A "$1" 2>/dev/null)" ] && die "$1 exists and is not empty"
    D=$(absdir "$1")
    CLEANUP_HINT="daemons may be left running; logs in $D/log; clean up with: $0 down $D"
    need ceph-mon ceph-mon; need ceph-mgr ceph-mgr; need ceph-osd ceph-osd
    need ceph ceph-common; need rbd ceph-common; need monmaptool ceph-common
    need ceph-authtool ceph-common; need uuidgen uuid-runtime; need python3 python3
    local timeout_s=$TMO
    local mport=${CEPH_SINGLE_MON_PORT:-3300}
    local t_start=$SECONDS
    local fsid; fsid=$(uuidgen)
    local store_conf
    case ${CEPH_SINGLE_STORE:-memstore} in
    memstore)   # data lives in the OSD's RAM (RSS grows ~1.2x bytes written)
        store_conf="osd_objectstore = memstore
memstore_device_bytes = ${CEPH_SINGLE_MEM_BYTES:-512M}" ;;
    bluestore)  # data in a sparse file DIR/osd/ceph-0/block (needs O_DIRECT: no tmpfs/9p)
        store_conf="osd_objectstore = bluestore
bluestore_block_create = true
bluestore_block_size = ${CEPH_SINGLE_DISK_BYTES:-1G}
bluestore_fsck_on_mkfs = false
bluestore_fsck_on_mount = false
bluestore_cache_autotune = false
bluestore_cache_size = 33554432
osd_memory_target = 402653184
bluefs_buffered_io = false" ;;
    *) die "CEPH_SINGLE_STORE must be memstore or bluestore" ;;
    esac
    # Lean mgr (default): don't even import the python modules (saves RAM and
    # CPU, esp. under TCG).  The always-on ones then raise MGR_MODULE_ERROR
    # (HEALTH_ERR), which we mute.  CEPH_SINGLE_MGR_LEAN=0 loads the defaults.
    local mgr_disabled=""
    if [ "${CEPH_SINGLE_MGR_LEAN:-1}" = 1 ]; then
        mgr_disabled="mgr_disabled_modules = alerts,balancer,crash,devicehealth,influx,insights,iostat,localpool,mirroring,nfs,orchestrator,osd_perf_query,osd_support,pg_autoscaler,progress,prometheus,restful,selftest,snap_schedule,stats,telegraf,telemetry,test_orchestrator,volumes,zabbix,dashboard,cephadm,rook,k8sevents,diskprediction_local"
    fi
    mkdir -p "$D"/{run,log,mon/ceph-a,mgr/ceph-x,osd/ceph-0,crash,tmp}

    cat >"$D/ceph.conf" <<EOF
[global]
fsid = $fsid
mon_host = [v2:$ip:$mport,v1:$ip:$((mport + 1))]
public_addr = $ip
cluster_addr = $ip
ms_bind_ipv4 = true
ms_bind_ipv6 = false
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
auth_allow_insecure_global_id_reclaim = false
keyring = $D/keyring
run_dir = $D/run
admin_socket = $D/run/\$cluster-\$name.asok
pid_file = $D/run/\$name.pid
log_file = $D/log/\$name.log
crash_dir = $D/crash
tmp_dir = $D/tmp
log_to_stderr = false
err_to_stderr = true
mon_cluster_log_file = $D/log/cluster.log
mon_cluster_log_to_syslog = false
log_to_syslog = false
ms_async_op_threads = 1

# single node, size 1, tiny pools
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
mon_warn_on_insecure_global_id_reclaim_allowed = false
mon_max_pg_per_osd = 1000
mon_data_avail_warn = 2
mon_data_avail_crit = 1

[client]
# watch pings are sent every objecter tick; must be well below the OSD's
# osd_client_watch_timeout (which bounds exclusive-lock takeover on crash)
objecter_tick_interval = 1
# distinct per process so CLI calls and gateways don't fight over one socket
admin_socket = $D/run/\$cluster-\$name.\$pid.asok
log_file = $D/log/client.log

# rbd defaults for images created here
rbd_default_features = ${CEPH_SINGLE_FEATURES:-layering,exclusive-lock}

[mon]
mon_data = $D/mon/\$cluster-\$id
mon_initial_members = a
mon_memory_target = 134217728
mon_osd_blocklist_default_expire = 600
mon_osd_down_out_interval = 0
mon_warn_on_osd_down_out_interval_zero = false
mgr_initial_modules =

[mgr]
mgr_data = $D/mgr/\$cluster-\$id
$mgr_disabled

[osd]
osd_data = $D/osd/\$cluster-\$id
${store_conf}
osd_op_num_shards = 1
osd_op_num_threads_per_shard = 2
osd_client_watch_timeout = ${CEPH_SINGLE_WATCH_TIMEOUT:-10}
osd_crush_update_on_start = true
osd_max_object_name_len = 256
osd_max_object_namespace_len = 64
osd_scrub_auto_repair = false
osd_scrub_begin_hour = 0
osd_scrub_end_hour = 0
osd_heartbeat_grace = 20
EOF

    # keyring: auth is none, but mon --mkfs still wants a mon. key
    ceph-authtool --create-keyring "$D/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool "$D/keyring" --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null

    monmaptool --create --fsid "$fsid" \
        --addv a "[v2:$ip:$mport,v1:$ip:$((mport + 1))]" "$D/tmp/monmap" >/dev/null
    ceph-mon --conf "$D/ceph.conf" --mkfs -i a --monmap "$D/tmp/monmap" \
        --keyring "$D/keyring" >"$D/log/mkfs-mon.out" 2>&1 \
        || { cat "$D/log/mkfs-mon.out" >&2; die "ceph-mon --mkfs failed"; }

    log "starting mon.a on $ip:$mport"
    run_nice ceph-mon --conf "$D/ceph.conf" -i a >>"$D/log/stderr-mon.a" 2>&1 \
        || { dump_logs; die "ceph-mon failed to start"; }
    wait_for "$TMO" "mon quorum" cephc quorum_status || { dump_logs; die "mon not reachable"; }

    log "starting mgr.x"
    run_nice ceph-mgr --conf "$D/ceph.conf" -i x >>"$D/log/stderr-mgr.x" 2>&1 \
        || { dump_logs; die "ceph-mgr failed to start"; }

    if [ -n "$mgr_disabled" ]; then
        wait_for "$TMO" "mgr active" bash -c "timeout 30 ceph --conf '$D/ceph.conf' mgr stat | grep -q '\"available\": true'" \
            || { dump_logs; die "mgr did not become active"; }
        cephc health mute MGR_MODULE_ERROR --sticky >/dev/null 2>&1 || true
    fi

    log "creating osd.0 (${CEPH_SINGLE_STORE:-memstore})"
    local ouuid; ouuid=$(uuidgen)
    local oid; oid=$(cephc osd new "$ouuid") || { dump_logs; die "osd new failed"; }
    [ "$oid" = 0 ] || die "unexpected osd id '$oid'"
    ceph-osd --conf "$D/ceph.conf" -i 0 --mkfs --osd-uuid "$ouuid" \
        >"$D/log/mkfs-osd.out" 2>&1 \
        || { cat "$D/log/mkfs-osd.out" >&2; die "ceph-osd --mkfs failed"; }
    run_nice ceph-osd --conf "$D/ceph.conf" -i 0 >>"$D/log/stderr-osd.0" 2>&1 \
        || { dump_logs; die "ceph-osd failed to start"; }

    wait_for "$timeout_s" "osd.0 up" \
        bash -c "timeout 30 ceph --conf '$D/ceph.conf' osd dump -f json | grep -q '\"up\":1'" \
        || { dump_logs; die "osd.0 did not come up"; }

    log "creating pool rbd + image img"
    cephc osd pool create rbd 8 8 replicated >/dev/null 2>&1 \
        || cephc osd pool create rbd 8 8 replicated \
        || { dump_logs; die "pool create failed"; }
    rbdc pool init rbd || { dump_logs; die "rbd pool init failed"; }
    rbdc create --size "${CEPH_SINGLE_IMG_SIZE:-256M}" rbd/img \
        || { dump_logs; die "rbd create failed"; }

    wait_for "$timeout_s" "HEALTH_OK/WARN, osd up+in, all PGs active+clean" healthy \
        || { dump_logs; die "cluster did not become healthy"; }
    echo "$ip" >"$D/ip"
    CLEANUP_HINT=""
    log "cluster up in $((SECONDS - t_start))s: conf $D/ceph.conf, image rbd/img"
}

cmd_gateway() {
    [ $# -ge 2 ] || usage
    D=$(cd "$1" && pwd) || die "no such dir $1"
    local port=$2 ip=${3:-$(cat "$D/ip" 2>/dev/null || echo 127.0.0.1)}
    need qemu-nbd qemu-utils
    local pidf="$D/run/qemu-nbd.$port.pid" logf="$D/log/qemu-nbd.$port.log"
    pid_alive "$pidf" && die "gateway on port $port already running (pid $(cat "$pidf"))"
    rm -f "$pidf"
    # cache=none -> librbd rbd_cache=false, so nothing is held in the gateway:
    # a write acked by one gateway is on the OSD and visible via the other.
    # Each gateway is a separate librados client (own id/address/watch).
    # Per-gateway admin socket + librbd log (passed through the rbd: filename
    # as rados config options).  NB: with --fork the qemu-nbd parent exits 1 if
    # the child printed *anything* to stderr (e.g. a librados warning), even
    # though the server runs; so judge by the pid file, not the exit code.
    local rc=0
    run_nice qemu-nbd --fork --pid-file="$pidf" \
        --format=raw --persistent --shared=8 --cache=none --discard=unmap \
        -b "$ip" -p "$port" -x img \
        "rbd:rbd/img:conf=$D/ceph.conf:id=admin:admin_socket=$D/run/gw.$port.asok:log_file=$D/log/gw.$port.librbd.log" \
        >>"$logf" 2>&1 || rc=$?
    if ! pid_alive "$pidf"; then
        tail -n 20 "$logf" >&2; die "qemu-nbd failed to start on $ip:$port (rc $rc)"
    fi
    [ "$rc" = 0 ] || { log "warning: qemu-nbd rc $rc but server running; see $logf:"; tail -n 5 "$logf" >&2; }
    local uri="nbd://$ip:$port/img"
    if command -v nbdinfo >/dev/null 2>&1; then
        wait_for "$TMO" "nbdinfo $uri" timeout 20 nbdinfo --size "$uri" \
            || { tail -n 20 "$logf" >&2; die "gateway $uri not answering"; }
    else
        wait_for "$TMO" "qemu-img info $uri" timeout 20 qemu-img info "$uri" \
            || { tail -n 20 "$logf" >&2; die "gateway $uri not answering"; }
    fi
    log "gateway $uri pid $(cat "$pidf")"
}

cmd_gw_stop() {
    [ $# -ge 2 ] || usage
    D=$(cd "$1" && pwd) || die "no such dir $1"
    local pidf="$D/run/qemu-nbd.$2.pid" sig=${3:-TERM}
    pid_alive "$pidf" || { log "gateway $2 not running"; rm -f "$pidf"; return 0; }
    local pid; pid=$(cat "$pidf")
    kill "-$sig" "$pid"
    for _ in $(seq 100); do alive "$pid" || break; sleep 0.05; done
    if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    rm -f "$pidf"
    log "gateway $2 (pid $pid) stopped with SIG$sig"
}

# kill the process in a pid file, only if it still looks like one of ours
kill_pidfile() {
    local f=$1 pid
    [ -f "$f" ] || return 0
    pid=$(cat "$f")
    if [ -n "$pid" ] && alive "$pid" \
        && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$D/"; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do alive "$pid" || break; sleep 0.05; done
        if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    fi
}

cmd_down() {
    [ $# -ge 1 ] || usage
    [ -d "$1" ] || { log "$1: nothing to do"; return 0; }
    D=$(cd "$1" && pwd)
    [ -f "$D/ceph.conf" ] || die "$D does not look like a ceph-single dir"
    local f
    for f in "$D"/run/qemu-nbd.*.pid; do kill_pidfile "$f"; done
    for f in "$D/run/osd.0.pid" "$D/run/mgr.x.pid" "$D/run/mon.a.pid"; do kill_pidfile "$f"; done
    # stragglers (e.g. pid file not yet written): anything whose cmdline names our conf
    local p
    for p in $(pgrep -f -- "$D/ceph.conf" || true); do
        [ "$p" = $$ ] || kill -KILL "$p" 2>/dev/null || true
    done
    rm -rf "$D"
    log "down: removed $D"
}

cmd_status() { D=$(cd "$1" && pwd); cephc -s; }
cmd_env()    { D=$(cd "$1" && pwd); echo "export CEPH_CONF=$D/ceph.conf"; }

[ $# -ge 1 ] || usage
sub=$1; shift
case $sub in
    up)      cmd_up "$@" ;;
    gateway) cmd_gateway "$@" ;;
    gw-stop) cmd_gw_stop "$@" ;;
    down)    cmd_down "$@" ;;
    status)  [ $# -ge 1 ] || usage; cmd_status "$@" ;;
    env)     [ $# -ge 1 ] || usage; cmd_env "$@" ;;
    *)       usage ;;
esac
