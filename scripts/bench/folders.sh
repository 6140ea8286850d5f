#!/usr/bin/env bash
# Folder-sync benchmark: shoal and Syncthing side by side, in one run, on a
# LAN of two network namespaces joined by a veth pair (root only; nothing
# leaves the namespaces). Installs Debian's syncthing and iperf3 if missing.
# Prints one table; raw figures go to $WORK/results.json.
#
# usage: sudo scripts/bench/folders.sh [--big-mib N] [--mid-mib N] [--edits N]
#                                      [--default-delay-edits N] [--skip-syncthing]
#                                      [--only big,small,edit,insert,scale] [--transport tcp|quic]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null; then
  echo "skip: the folder benchmark needs root and iproute2 (it builds its own network namespaces)"
  exit 77
fi
need=()
command -v syncthing >/dev/null || need+=(syncthing)
command -v iperf3 >/dev/null || need+=(iperf3)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
fi
# SHOAL_BENCH_BIN=PATH runs that shoal binary instead of this tree's release
# build (to compare two builds on the same machine; a quick build with
# CARGO_PROFILE_RELEASE_LTO=off is fine for that, not for the table).
cargo build --release -q -p shoal-cli -p shoal-tests --bins
shoal_bin=${SHOAL_BENCH_BIN:-$root/target/release/shoal}
ns_a="shoal-fa-$$" ns_b="shoal-fb-$$"
work=$(mktemp -d /var/tmp/shoal-bench-folders.XXXXXX)
cleanup() {
  ip netns pids "$ns_a" 2>/dev/null | xargs -r kill 2>/dev/null || true
  ip netns pids "$ns_b" 2>/dev/null | xargs -r kill 2>/dev/null || true
  ip netns del "$ns_a" 2>/dev/null || true
  ip netns del "$ns_b" 2>/dev/null || true
  if [ -n "${KEEP_LOGS:-}" ]; then cp "$work"/*.log "$KEEP_LOGS"/ 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
ip netns add "$ns_a"
ip netns add "$ns_b"
ip link add va netns "$ns_a" type veth peer name vb netns "$ns_b"
ip -n "$ns_a" addr add 10.203.0.1/24 dev va
ip -n "$ns_b" addr add 10.203.0.2/24 dev vb
for ns in "$ns_a" "$ns_b"; do ip -n "$ns" link set lo up; done
ip -n "$ns_a" link set va up
ip -n "$ns_b" link set vb up
echo "(namespaces $ns_a and $ns_b joined by veth; work dir $work)"
python3 "$root/scripts/bench/folders.py" \
  --shoal "$shoal_bin" --b3speed "$root/target/release/shoal-b3speed" \
  --ns-a "$ns_a" --ns-b "$ns_b" --ip-a 10.203.0.1 --ip-b 10.203.0.2 --dev va \
  --work "$work" "$@"
