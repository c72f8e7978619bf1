# Kernel log lines that fail a test run: the headers of real kernel reports,
# never boot banners (lockdep's "RCU lockdep checking is enabled", KASAN's
# "KernelAddressSanitizer initialized", "kfence: initialized" must not match).
#
# One pattern per line, read by tests/vm and tests/run (Python re) and by
# tests/guest-run (grep -E -f). Keep to the syntax both share: literal text,
# "." and ".*"; no backslashes, no character classes. Lines starting with #
# and empty lines are ignored. Matching is case-sensitive.
#
# `tests/vm --self-test` checks these against sample reports and banners.

# WARN_ON and lockdep reports ("WARNING: possible circular locking ...")
WARNING:
# BUG_ON, KASAN ("BUG: KASAN: slab-use-after-free"), KFENCE ("BUG: KFENCE:"),
# sleeping in atomic context, soft lockups ("watchdog: BUG: soft lockup")
BUG:
kernel BUG at
Oops
KASAN:
UBSAN:
possible circular locking dependency
possible recursive locking
inconsistent lock state
suspicious RCU usage
INFO: task .* blocked for more than
Kernel panic
general protection fault
soft lockup
hard LOCKUP
# A Rust panic prints "panicked at FILE:LINE:COL:" and then BUG()s.
rust_panic
panicked at
Call Trace:
