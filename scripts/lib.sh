# Shared settings for enbd's scripts. Source it; do not run it.
# shellcheck shell=bash

ENBD_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ENBD_CACHE=${ENBD_CACHE:-$HOME/.cache/enbd}
ENBD_TOOLS=$ENBD_CACHE/tools
# The fuzz builds (nightly, AddressSanitizer) live outside the tree, so a
# fresh clone on a machine that built them before does not redo them.
ENBD_FUZZ_TARGET=$ENBD_CACHE/fuzz/target
BINDGEN_VERSION=0.70.1
VNG_VERSION=1.42
BINDGEN=$ENBD_TOOLS/bindgen-$BINDGEN_VERSION/bin/bindgen
VNG=$ENBD_TOOLS/vng-venv/bin/vng
CARGO_FUZZ_VERSION=0.13.2
CARGO_FUZZ=$ENBD_TOOLS/cargo-fuzz-$CARGO_FUZZ_VERSION/bin/cargo-fuzz
# The kernel and the module are built with Debian's rustc-web, which ships rust-src;
# rustup's toolchain (used for userspace/) has none.
KRUSTC=/usr/bin/rustc
KMAKEFLAGS=(LLVM=1 "RUSTC=$KRUSTC" RUSTDOC=/usr/bin/rustdoc HOSTRUSTC=$KRUSTC "BINDGEN=$BINDGEN")

export PATH="$HOME/.cargo/bin:$PATH"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# The kernel variants: "default" (scripts/kernel.config) and "debug" (the
# same plus scripts/kernel-debug.config: KASAN, lockdep, KFENCE, UBSAN).
KERNEL_VARIANTS=(default debug)

# Key of the kernel build: source package version, config fragment, this
# script library and the toolchain. Any change gives a new cache directory.
# The debug variant also hashes its fragment; the default variant's key is
# what it always was, so its cached build stays valid.
kernel_key() {
	local variant=${1:-default}
	{
		dpkg-query -W -f '${Version}\n' linux-source-6.12
		cat "$ENBD_ROOT/scripts/kernel.config"
		"$KRUSTC" -V
		"$BINDGEN" --version 2>/dev/null || echo "bindgen $BINDGEN_VERSION"
		clang --version | head -n1
		echo "recipe 1"
		if [ "$variant" = debug ]; then
			echo "variant debug"
			cat "$ENBD_ROOT/scripts/kernel-debug.config"
		fi
	} | sha256sum | cut -c1-16
}

# The build directory of a variant (default: "default").
kernel_dir() {
	case ${1:-default} in
	default) echo "$ENBD_CACHE/kernel/$(kernel_key)" ;;
	debug) echo "$ENBD_CACHE/kernel/debug-$(kernel_key debug)" ;;
	*) die "unknown kernel variant '$1' (${KERNEL_VARIANTS[*]})" ;;
	esac
}
