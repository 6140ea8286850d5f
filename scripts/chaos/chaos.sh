#!/usr/bin/env bash
# Chaos run (issue 19): three real `shoal up` processes, each in its own
# network namespace on a bridge (plus the bridge's namespace), paired by
# invite codes; random file operations on all three folders on a small pool
# of colliding paths, while nodes are killed with SIGKILL (also while a large
# file is in flight) and restarted, and links are cut (a bridge port down,
# or blackhole routes between two namespaces) and healed. At the end
# everything is healed and restarted; the script waits until every node
# says "in sync" and the three trees are identical (`.shoal/` left out),
# then checks that the last content each device wrote to each path (and
# did not itself delete or move afterwards) survives somewhere (a live
# file, a conflict copy, or `.shoal/versions/` of any device), and that no
# live file holds content nobody wrote (torn). See scripts/chaos/README.md.
#
# All traffic stays on 10.233.0.0/24 inside namespaces this script creates
# and on each namespace's own loopback (the local API); mDNS is off.
# Needs root and iproute2 and python3. Exit 0 when every run passes, 1 when
# something was lost, torn or did not converge, 77 when it cannot run here.
#
# usage: scripts/chaos/chaos.sh [--rounds N] [--seed S] [--runs R]
#                               [--timeout SECS] [--keep] [--out DIR]
#                               [--script FILE]  (replay a scenario; see README)
#   (SHOAL_BIN=path/to/shoal to choose the binary)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
SHOAL_BIN=${SHOAL_BIN:-$root/target/debug/shoal}
rounds=20
seed=$(( $(date +%s) % 100000 ))
runs=1
timeout=240
keep=0
out=${CHAOS_OUT:-/tmp/shoal-chaos}
script=

usage() { sed -n '20,24p' "$0"; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    --rounds) rounds=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --timeout) timeout=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --out) out=$2; shift 2 ;;
    --script) script=$(readlink -f "$2"); shift 2 ;;
    -h|--help) usage ;;
    *) echo "chaos: unknown argument $1" >&2; usage ;;
  esac
done

skip() { echo "chaos: SKIP: $*"; exit 77; }
[ "$(id -u)" = 0 ] || skip "needs root (ip netns)"
command -v ip >/dev/null || skip "needs iproute2 (ip)"
command -v python3 >/dev/null || skip "needs python3"
[ -x "$SHOAL_BIN" ] || { echo "chaos: $SHOAL_BIN missing; build with cargo build -p shoal-cli" >&2; exit 1; }
SHOAL_BIN=$(readlink -f "$SHOAL_BIN")

tag="ch$$"
br="${tag}br"
nss=("${tag}a" "${tag}b" "${tag}c")
ips=(10.233.0.1 10.233.0.2 10.233.0.3)

teardown() {
  # Only processes inside our own namespaces: the nodes this run started.
  for n in "${nss[@]}" "$br"; do
    for p in $(ip netns pids "$n" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
  done
  for n in "${nss[@]}" "$br"; do ip netns del "$n" 2>/dev/null || true; done
}
trap teardown EXIT

setup() {
  ip netns add "$br" 2>/dev/null || return 1
  ip -n "$br" link add br0 type bridge
  ip -n "$br" link set br0 up
  ip -n "$br" link set lo up
  for i in 0 1 2; do
    n=${nss[$i]}
    ip netns add "$n"
    ip link add "v$i" netns "$n" type veth peer name "p$i" netns "$br"
    ip -n "$br" link set "p$i" master br0 up
    ip -n "$n" addr add "${ips[$i]}/24" dev "v$i"
    ip -n "$n" link set "v$i" up
    ip -n "$n" link set lo up
  done
}

mkdir -p "$out"
results=()
fail=0
for ((r = 0; r < runs; r++)); do
  s=$((seed + r))
  if ! setup; then
    teardown
    [ "$r" = 0 ] && skip "cannot create network namespaces here"
    echo "chaos: could not set up namespaces for seed $s" >&2; fail=1; break
  fi
  dir="$out/seed-$s-$(date -u +%Y%m%dT%H%M%S)"
  mkdir -p "$dir"
  echo "chaos: run $((r + 1))/$runs, seed $s, $rounds rounds, logs in $dir"
  rc=0
  python3 "$here/chaos.py" run --bin "$SHOAL_BIN" --work "$dir" --seed "$s" --rounds "$rounds" \
    --timeout "$timeout" --ns "$(IFS=,; echo "${nss[*]}")" --ips "$(IFS=,; echo "${ips[*]}")" \
    --bridge "$br" ${script:+--script "$script"} 2>&1 | tee "$dir/chaos.out" || true
  python3 -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1])).get("ok") else 1)' \
    "$dir/result.json" 2>/dev/null || rc=1
  teardown
  results+=("$dir/result.json")
  if [ "$rc" != 0 ]; then
    fail=1
    python3 "$here/chaos.py" explain "$dir" >"$dir/explain.txt" 2>&1 || true
    echo "chaos: seed $s FAILED; everything kept in $dir (see explain.txt)"
  elif [ "$keep" = 0 ]; then
    # Keep the op log, the node logs and the result; drop folders and homes.
    rm -rf "$dir/a" "$dir/b" "$dir/c" "$dir"/home-?
  fi
done

echo
python3 "$here/chaos.py" table "${results[@]}"
exit "$fail"
