# Shared settings for enbd's scripts. Source it; do not run it.
# shellcheck shell=bash

ENBD_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ENBD_CACHE=${ENBD_CACHE:-$HOME/.cache/enbd}
ENBD_TOOLS=$ENBD_CACHE/tools
BINDGEN_VERSION=0.70.1
VNG_VERSION=1.42
BINDGEN=$ENBD_TOOLS/bindgen-$BINDGEN_VERSION/bin/bindgen
VNG=$ENBD_TOOLS/vng-venv/bin/vng
# The kernel and the module are built with Debian's rustc-web, which ships rust-src;
# rustup's toolchain (used for userspace/) has none.
KRUSTC=/usr/bin/rustc
KMAKEFLAGS=(LLVM=1 "RUSTC=$KRUSTC" RUSTDOC=/usr/bin/rustdoc HOSTRUSTC=$KRUSTC "BINDGEN=$BINDGEN")

export PATH="$HOME/.cargo/bin:$PATH"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Key of the kernel build: source package version, config fragment, this
# script library and the toolchain. Any change gives a new cache directory.
kernel_key() {
	{
		dpkg-query -W -f '${Version}\n' linux-source-6.12
		cat "$ENBD_ROOT/scripts/kernel.config"
		"$KRUSTC" -V
		"$BINDGEN" --version 2>/dev/null || echo "bindgen $BINDGEN_VERSION"
		clang --version | head -n1
		echo "recipe 1"
	} | sha256sum | cut -c1-16
}

kernel_dir() { echo "$ENBD_CACHE/kernel/$(kernel_key)"; }
