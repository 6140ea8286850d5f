#!/usr/bin/env bash
# Builds one of the shoal-tests benchmark binaries (release) and runs it in a
# network namespace of its own (loopback only) when root; otherwise on the
# host's loopback. Shared by docs.sh and events.sh.
#
# usage: scripts/bench/in-netns.sh BIN [ARGS...]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
name=$1
shift
cargo build --release -q -p shoal-tests --bin "$name"
bin="$root/target/release/$name"
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
