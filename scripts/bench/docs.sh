#!/usr/bin/env bash
# Document propagation benchmark (2 and 8 in-process nodes). Runs inside a
# network namespace of its own (loopback only) when root; otherwise on the
# host's loopback. Prints a table.
#
# usage: scripts/bench/docs.sh [--changes N] [--burst N]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
cargo build --release -q -p shoal-tests --bin shoal-bench-docs
bin="$root/target/release/shoal-bench-docs"
if [ "$(id -u)" = 0 ] && command -v ip >/dev/null; then
  ns="shoal-bench-$$"
  ip netns add "$ns"
  trap 'ip netns del "$ns" 2>/dev/null || true' EXIT
  ip -n "$ns" link set lo up
  echo "(running in network namespace $ns, loopback only)"
  ip netns exec "$ns" "$bin" "$@"
else
  echo "(not root: running on the host loopback)"
  "$bin" "$@"
fi
