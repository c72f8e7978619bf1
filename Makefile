# SPDX-License-Identifier: GPL-2.0
#
# enbd top-level make. `make` builds enbd.ko (and the pinned test kernel the
# first time, ~21 min, cached under ~/.cache/enbd) plus the userspace tools.
#
#   make            module + userspace
#   make module     drivers/block/enbd/enbd.ko only; KDIR=<tree> builds it
#                   against any Rust-enabled 6.12 tree or headers
#   make check      every test: cargo tests, clippy, QEMU suite
#   make demo       boot the VM, load enbd.ko, show /proc/nbdinfo
#   make bench      benchmark enbd vs Linux nbd vs loop in the VM
#   make clippy     clippy on the module and on userspace
#   make fmt        rustfmt everything

SHELL := /bin/bash
ENBD_CACHE ?= $(HOME)/.cache/enbd
BINDGEN ?= $(ENBD_CACHE)/tools/bindgen-0.70.1/bin/bindgen
KRUSTC := /usr/bin/rustc
KFLAGS = LLVM=1 RUSTC=$(KRUSTC) RUSTDOC=/usr/bin/rustdoc HOSTRUSTC=$(KRUSTC) BINDGEN=$(BINDGEN)

ifeq ($(KDIR),)
KDIR_DEP := kernel
KDIR = $(shell scripts/build-kernel --print-dir)
endif

.PHONY: all module kernel userspace check demo bench clippy clippy-module fmt clean

all: module userspace

kernel:
	@scripts/build-kernel >/dev/null

module: $(KDIR_DEP)
	$(MAKE) -C $(KDIR) M=$(CURDIR) $(KFLAGS) modules

userspace:
	cd userspace && cargo build --release --locked

check:
	tests/check

demo:
	scripts/demo

bench:
	scripts/bench

clippy: clippy-module
	cd userspace && cargo clippy --locked --all-targets -- -D warnings

# The kernel's clippy-driver run; kbuild only warns, so warnings fail here.
clippy-module: $(KDIR_DEP)
	@touch drivers/block/enbd/main.rs
	@$(MAKE) -C $(KDIR) M=$(CURDIR) $(KFLAGS) CLIPPY=1 CLIPPY_DRIVER=/usr/bin/clippy-driver modules 2>&1 | tee /tmp/enbd-clippy.$$$$; \
	 ! grep -qE '^(warning|error)' /tmp/enbd-clippy.$$$$; rc=$$?; rm -f /tmp/enbd-clippy.$$$$; exit $$rc

fmt:
	cd userspace && cargo fmt
	rustfmt --edition 2021 drivers/block/enbd/main.rs

clean:
	-[ -n "$(KDIR)" ] && [ -d "$(KDIR)" ] && $(MAKE) -C $(KDIR) M=$(CURDIR) $(KFLAGS) clean
	cd userspace && cargo clean
