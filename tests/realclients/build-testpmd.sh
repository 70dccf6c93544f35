#!/bin/bash
# A real DPDK testpmd (af_xdp PMD with dp_path=) for the integration tests: Debian trixie's binary packages
# in a trixie root tree, made once per machine. trixie's DPDK 24.11 needs trixie's libc, and every DPDK >= 23
# source package gives 404 on this machine's registry, so nothing is compiled: debootstrap, then apt inside.
#
#   build-testpmd.sh               make the tree unless the cache has it; prints its directory
#   build-testpmd.sh --print-path  only print where it is (or would be)
#
# The tree lives outside the clone, under $XSKBROKER_TEST_CACHE (default /var/cache/xskbroker-test), named by
# the DPDK version and a hash of this script: change either and a new one is made beside the old. It holds
# usr/bin/dpdk-testpmd (taken from dpdk-dev, which also drags in every -dev package: only the libraries
# testpmd links and the three drivers it loads here are installed) and BUILD-INFO. It keeps no apt source
# (the mirror is the machine's, found at run time) and no package lists. Made in a temporary directory
# renamed into place at the end, under a lock, like build-qemu.sh.
set -euo pipefail

SUITE="trixie"
DPDK_VERSION="24.11.8-0+deb13u1"   # trixie; has the af_xdp PMD's dp_path= (23.11.2+, 24.07+)
# testpmd's libraries (its DT_NEEDED, checked below with ldd) and the drivers the tests load: af_xdp (the
# PMD), bus-vdev (--vdev), mempool-ring (the default mempool). Every one pinned to DPDK_VERSION.
RTE_PACKAGES="eal25 ethdev25 kvargs25 log25 telemetry25 net25 mbuf25 mempool25 ring25 meter25 cmdline25
  crypto-scheduler25 cryptodev25 rcu25 bus-vdev25 reorder25 security25 bitratestats25 metrics25 bpf25 gro25
  gso25 latencystats25 pdump25 pcapng25 net-bnxt25 bus-pci25 pci25 hash25 net-i40e25 net-ixgbe25 bus-dpaa25
  common-dpaax25 eventdev25 timer25 dmadev25 mempool-dpaa25 net-dpaa25 net-bond25 sched25 ip-frag25
  net-iavf25 common-iavf25 net-ice25 net-mlx5-25 common-mlx5-25 bus-auxiliary25
  net-af-xdp25 mempool-ring25"
OTHER_PACKAGES="libjansson4 libbsd0 libelf1t64 libpcap0.8t64 libnuma1 libfdt1"

SELF="$(readlink -f "${BASH_SOURCE[0]}")"
CACHE="${XSKBROKER_TEST_CACHE:-/var/cache/xskbroker-test}"
KEY="$(sha256sum "$SELF" | cut -c1-12)"
NAME="${SUITE}-dpdk-${DPDK_VERSION}-${KEY}"
DEST="$CACHE/$NAME"

# All in a function run from the last line: bash has read the whole file before it runs any of it.
main() {
if [ "${1:-}" = "--print-path" ]; then echo "$DEST"; exit 0; fi
[ -x "$DEST/usr/bin/dpdk-testpmd" ] && { echo "$DEST"; exit 0; }
[ "$(id -u)" = 0 ] || { echo "build-testpmd.sh: making $DEST needs root (debootstrap, $CACHE)" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "build-testpmd.sh: debootstrap is not installed" >&2; exit 1; }

mkdir -p "$CACHE"
exec 9>"$CACHE/.testpmd-build.lock"
if ! flock -n 9; then
  echo "build-testpmd.sh: another build of the testpmd tree is running; waiting for it" >&2
  flock 9
fi
[ -x "$DEST/usr/bin/dpdk-testpmd" ] && { echo "$DEST"; exit 0; }   # the other build made it
rm -rf "$CACHE"/.testpmd-build.*/   # under the lock: only litter of a killed build

START=$(date +%s)
echo "build-testpmd.sh: making a $SUITE tree with DPDK $DPDK_VERSION's testpmd in $DEST (once per machine)" >&2

WORK="$(mktemp -d "$CACHE/.testpmd-build.XXXXXX")"   # same filesystem as $DEST: the rename is atomic
ROOT="$WORK/root"
LOG="$WORK/build.log"
trap '[ "${XSKBROKER_TESTPMD_KEEP_FAILED:-0}" = 1 ] && [ -d "$ROOT" ] || rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM HUP
fail() { echo "build-testpmd.sh: $1 (last lines of $LOG:)" >&2; tail -n 40 "$LOG" >&2 || true; exit 1; }

URI="$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
[ -n "$URI" ] || URI="$(awk '$1=="deb"{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
[ -n "$URI" ] || { echo "build-testpmd.sh: no Debian mirror in /etc/apt" >&2; exit 1; }

debootstrap --variant=minbase "$SUITE" "$ROOT" "$URI" >>"$LOG" 2>&1 || fail "debootstrap $SUITE failed"

pkgs=""
for p in $RTE_PACKAGES; do pkgs="$pkgs librte-$p=$DPDK_VERSION"; done
# apt and dpkg's scripts inside want /proc; a private mount namespace keeps it from outliving the build
unshare --mount --propagation private -- bash -euo pipefail -c '
  ROOT="$1"; shift; V="$1"; shift
  mount -t proc proc "$ROOT/proc"
  inside() { chroot "$ROOT" env DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@"; }
  inside apt-get -q -o APT::Sandbox::User=root update
  inside apt-get -q -y -o APT::Sandbox::User=root install --no-install-recommends "$@"
  inside sh -c "cd /tmp && apt-get -q -o APT::Sandbox::User=root download dpdk-dev=$V"
  dpkg-deb --fsys-tarfile "$ROOT"/tmp/dpdk-dev_*.deb | tar -x -C "$ROOT" ./usr/bin/dpdk-testpmd
  rm -f "$ROOT"/tmp/dpdk-dev_*.deb
  inside apt-get clean
' build "$ROOT" "$DPDK_VERSION" $pkgs $OTHER_PACKAGES >>"$LOG" 2>&1 || fail "installing DPDK in the tree failed"

missing="$(chroot "$ROOT" ldd /usr/bin/dpdk-testpmd 2>&1 | grep 'not found' || true)"
[ -z "$missing" ] || fail "testpmd lacks libraries in the tree: $missing"
ls "$ROOT"/usr/lib/x86_64-linux-gnu/dpdk/pmds-*/librte_net_af_xdp.so* >/dev/null 2>&1 \
  || fail "no af_xdp PMD in the tree's driver directory"

# no apt source (it names the machine's mirror), no lists, no docs: the tree is only run
rm -rf "$ROOT"/etc/apt/sources.list "$ROOT"/etc/apt/sources.list.d/* "$ROOT"/var/lib/apt/lists/* \
  "$ROOT"/var/cache/apt/*.bin "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/* "$ROOT"/usr/share/locale/* \
  "$ROOT"/usr/share/info/* "$ROOT"/var/log/*.log "$ROOT"/var/log/apt/*
SECONDS_TAKEN=$(( $(date +%s) - START ))
{
  echo "suite=$SUITE"
  echo "dpdk=$DPDK_VERSION"
  echo "build_seconds=$SECONDS_TAKEN"
  echo "built=$(date -u +%FT%TZ)"
} >"$ROOT/BUILD-INFO"
chmod 0755 "$ROOT"   # the tests run testpmd in it as an unprivileged uid
mv -T "$ROOT" "$DEST"
echo "build-testpmd.sh: made in ${SECONDS_TAKEN}s, $(du -sm "$DEST" | cut -f1) MB: $DEST" >&2
echo "$DEST"
}

main "$@"; exit
