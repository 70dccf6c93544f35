#!/bin/bash
# A real QEMU with the af-xdp netdev for the integration tests, built once per machine from Debian's
# source packages (Debian ships no QEMU with af-xdp, and bookworm's libxdp 1.3.1 is too old for it).
#
#   build-qemu.sh               build it unless the cache has it; prints the cache directory
#   build-qemu.sh --print-path  only print where it is (or would be)
#
# The result lives outside the clone, under $XSKBROKER_TEST_CACHE (default /var/cache/xskbroker-test), in a
# directory named by the QEMU and xdp-tools versions and a hash of this script: change either (or the
# recipe) and a new one is built beside the old. It holds bin/qemu-system-x86_64, lib/libxdp.so.1 (found
# through an $ORIGIN rpath, never bookworm's library of the same soname) and BUILD-INFO (versions, time).
# The build happens in a temporary directory renamed into place at the end, under a lock: an interrupted
# build leaves no half cache, and two `make test` at once build it once.
set -euo pipefail

QEMU_VERSION="1:10.2.2+ds-1"      # sid; has af-xdp's map-path= (10.1+)
XDP_TOOLS_VERSION="1.6.3-1"       # sid; libxdp built against bookworm's libbpf
MESON_VERSION="1.9.0"             # QEMU 10.2 wants meson >= 1.5, bookworm has 1.0 (pinned as QEMU's own wheel)
PYCOTAP_VERSION="1.3.1"           # configure insists on it with meson
# compilers and libraries for both builds (clang/llvm compile libxdp's BPF objects; bzip2 and dtc are
# meson checks: without dtc QEMU wants prebuilt .dtb files, which Debian's tarball drops)
APT_PACKAGES="build-essential pkg-config ninja-build python3-venv libglib2.0-dev libbpf-dev libelf-dev
  zlib1g-dev libpcap-dev clang llvm m4 bzip2 xz-utils device-tree-compiler"

SELF="$(readlink -f "${BASH_SOURCE[0]}")"
CACHE="${XSKBROKER_TEST_CACHE:-/var/cache/xskbroker-test}"
KEY="$(sha256sum "$SELF" | cut -c1-12)"
NAME="qemu-${QEMU_VERSION#*:}-xdp-${XDP_TOOLS_VERSION}-${KEY}"
DEST="$CACHE/$NAME"

# All in a function run from the last line: bash has then read the whole file before it runs any of it,
# so editing the script during a build cannot derail that build.
main() {
if [ "${1:-}" = "--print-path" ]; then echo "$DEST"; exit 0; fi
[ -x "$DEST/bin/qemu-system-x86_64" ] && { echo "$DEST"; exit 0; }
[ "$(id -u)" = 0 ] || { echo "build-qemu.sh: building $DEST needs root (apt, $CACHE)" >&2; exit 1; }

mkdir -p "$CACHE"
exec 9>"$CACHE/.qemu-build.lock"
if ! flock -n 9; then
  echo "build-qemu.sh: another build of QEMU is running; waiting for it" >&2
  flock 9
fi
[ -x "$DEST/bin/qemu-system-x86_64" ] && { echo "$DEST"; exit 0; }   # the other build made it
# under the lock no build runs: a directory left by one that was killed (SIGKILL, power) is only litter
rm -rf "$CACHE"/.qemu-build.*/

START=$(date +%s)
echo "build-qemu.sh: building QEMU $QEMU_VERSION with libxdp from xdp-tools $XDP_TOOLS_VERSION into $DEST" >&2
echo "build-qemu.sh: (once per machine, about 5 minutes on 2 cores; log in the build directory)" >&2

missing=""
for p in $APT_PACKAGES; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "build-qemu.sh: installing build dependencies:$missing" >&2
  # stdout carries only the cache path: apt's chatter goes to stderr
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing; } >&2
fi

# same filesystem as $DEST, so the final rename is atomic
WORK="$(mktemp -d "$CACHE/.qemu-build.XXXXXX")"
# XSKBROKER_QEMU_KEEP_FAILED=1 keeps a failed build's directory for a look (never renamed into the cache)
trap '[ "${XSKBROKER_QEMU_KEEP_FAILED:-0}" = 1 ] && [ -d "$OUT" ] || rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM HUP   # interrupted: still through the EXIT trap
OUT="$WORK/out"
LOG="$WORK/build.log"
mkdir -p "$OUT/bin" "$OUT/lib" "$WORK/apt/lists/partial" "$WORK/apt/cache/archives/partial" "$WORK/src"
fail() { echo "build-qemu.sh: $1 (last lines of $LOG:)" >&2; tail -n 40 "$LOG" >&2 || true; exit 1; }

# Source packages through apt, from the mirror the machine already uses, with a private list: the
# system's apt configuration is left untouched.
URI="$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
[ -n "$URI" ] || URI="$(awk '$1=="deb"{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
[ -n "$URI" ] || { echo "build-qemu.sh: no Debian mirror in /etc/apt" >&2; exit 1; }
printf 'Types: deb-src\nURIs: %s\nSuites: trixie sid\nComponents: main\nSigned-By: %s\n' \
  "$URI" /usr/share/keyrings/debian-archive-keyring.gpg > "$WORK/apt/src.sources"
APT=(apt-get -q -o Dir::Etc::sourcelist=/dev/null -o "Dir::Etc::sourceparts=$WORK/apt"
     -o "Dir::State::Lists=$WORK/apt/lists" -o "Dir::Cache=$WORK/apt/cache" -o APT::Sandbox::User=root)
( cd "$WORK/src" && "${APT[@]}" update && "${APT[@]}" source --download-only \
    "qemu=$QEMU_VERSION" "xdp-tools=$XDP_TOOLS_VERSION" ) >>"$LOG" 2>&1 || fail "downloading the sources failed"

# libxdp alone (not the tools), against bookworm's libbpf, installed into the cache
XDP_SRC="$WORK/src/xdp-tools"
mkdir -p "$XDP_SRC" && tar -xzf "$WORK"/src/xdp-tools_*.orig.tar.gz -C "$XDP_SRC" --strip-components=1
( cd "$XDP_SRC" && export PREFIX="$OUT" LIBDIR="$OUT/lib" && FORCE_SYSTEM_LIBBPF=1 ./configure \
    && make -j"$(nproc)" -C lib/libxdp && make -C lib/libxdp install ) >>"$LOG" 2>&1 || fail "building libxdp failed"

# meson and pycotap from PyPI into a private venv of this build (not the project's venv)
python3 -m venv "$WORK/venv" >>"$LOG" 2>&1 || fail "python3 -m venv failed"
"$WORK/venv/bin/pip" install -q "meson==$MESON_VERSION" "pycotap==$PYCOTAP_VERSION" >>"$LOG" 2>&1 \
  || fail "installing meson from PyPI failed"

QEMU_SRC="$WORK/src/qemu"
mkdir -p "$QEMU_SRC" && tar -xJf "$WORK"/src/qemu_*.orig.tar.xz -C "$QEMU_SRC" --strip-components=1
# Debian's +ds tarball drops the firmware; meson still opens the edk2 .bz2 files: valid, empty ones
for fd in $(sed -n "s/^ *'\(edk2-[a-z0-9_-]*\.fd\)',$/\1/p" "$QEMU_SRC/pc-bios/meson.build"); do
  [ -e "$QEMU_SRC/pc-bios/$fd.bz2" ] || bzip2 -c </dev/null >"$QEMU_SRC/pc-bios/$fd.bz2"
done
# The smallest QEMU with af-xdp: one target, no TCG (the tests run guest-less under qtest), no docs, no debug
# info, and of the devices only the `pc` board: libvirt (9.0) hides the `none` machine and will not start a
# domain without a real one (docs/libvirt.md). The board's ACPI code needs CXL's (QEMU 10.2 links ACPI_CXL
# without it), hence the CXL lines.
# $ORIGIN/../lib makes it load the libxdp built above wherever the directory ends up.
printf '%s=y\n' CONFIG_I440FX CONFIG_PCI_EXPRESS CONFIG_PXB CONFIG_MSI_NONBROKEN CONFIG_PCIE_PORT CONFIG_CXL \
  CONFIG_CXL_MEM_DEVICE > "$QEMU_SRC/configs/devices/x86_64-softmmu/xskbroker.mak"
( cd "$QEMU_SRC" && mkdir build && cd build \
  && PKG_CONFIG_PATH="$OUT/lib/pkgconfig" ../configure --python="$WORK/venv/bin/python3" \
       --target-list=x86_64-softmmu --without-default-features --without-default-devices \
       --with-devices-x86_64=xskbroker \
       --enable-kvm --disable-tcg --disable-debug-info \
       --enable-bpf --enable-af-xdp --disable-docs --disable-download --disable-werror \
       --disable-install-blobs --extra-ldflags='-Wl,-rpath,$ORIGIN/../lib' \
  && ninja qemu-system-x86_64 ) >>"$LOG" 2>&1 || fail "building QEMU failed"
install -m 0755 "$QEMU_SRC/build/qemu-system-x86_64" "$OUT/bin/"

# It must load the libxdp built here: bookworm's libxdp1 (1.3.1) has the same soname.
linked="$(ldd "$OUT/bin/qemu-system-x86_64" | awk '$1=="libxdp.so.1"{print $3}')"
[ -n "$linked" ] && [ "$(readlink -f "$linked")" = "$(readlink -f "$OUT/lib/libxdp.so.1")" ] \
  || fail "QEMU links libxdp from '$linked', not $OUT/lib"
# (no grep -q: QEMU killed by SIGPIPE would fail the pipeline)
"$OUT/bin/qemu-system-x86_64" -machine none -netdev help >"$WORK/netdevs" 2>&1 || true
grep -x "af-xdp" "$WORK/netdevs" >/dev/null || fail "the built QEMU has no af-xdp netdev: $(cat "$WORK/netdevs")"
"$OUT/bin/qemu-system-x86_64" -machine help >"$WORK/machines" 2>&1 || true
grep "^pc " "$WORK/machines" >/dev/null || fail "the built QEMU has no pc machine: $(cat "$WORK/machines")"

rm -rf "$OUT/share" "$OUT/include" "$OUT/lib/pkgconfig" "$OUT/lib/libxdp.a"
SECONDS_TAKEN=$(( $(date +%s) - START ))
{
  echo "qemu=$QEMU_VERSION"
  echo "xdp-tools=$XDP_TOOLS_VERSION"
  echo "meson=$MESON_VERSION"
  echo "build_seconds=$SECONDS_TAKEN"
  echo "built=$(date -u +%FT%TZ)"
} >"$OUT/BUILD-INFO"
chmod -R a+rX "$OUT"   # the tests run it as an unprivileged uid
mv -T "$OUT" "$DEST"
echo "build-qemu.sh: built in ${SECONDS_TAKEN}s, $(du -sm "$DEST" | cut -f1) MB: $DEST" >&2
echo "$DEST"
}

main "$@"; exit
