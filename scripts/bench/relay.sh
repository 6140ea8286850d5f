#!/usr/bin/env bash
# Relay benchmark, in the NAT lab's namespaces (scripts/lab/natnet.sh; root
# only): two fresh devices behind two NATs, with only `shoal relay` in their
# config, share a space by grant (no addresses exchanged). Measures
#   1. the first document: from launching both fresh nodes to B holding a
#      document A wrote (reservations, DHT rendezvous, circuit, hello, sync),
#      and from B's import of the space to that moment; median of RUNS runs;
#   2. a 100 MiB file through the folder sync, relayed (hole punching off)
#      against direct (two devices on the same wan segment).
# Prints a table. usage: scripts/bench/relay.sh   (RUNS=10 MIB=100)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
RUNS=${RUNS:-10}
MIB=${MIB:-100}
TIMEOUT=${BENCH_TIMEOUT:-120}
. "$root/scripts/lab/natnet.sh"
why=$(nat_skip_reason); [ -z "$why" ] || { echo "relay bench: cannot run: $why"; exit 1; }
(cd "$root" && cargo build --release -q -p shoal-cli)
SHOAL_BIN=${SHOAL_BIN:-$root/target/release/shoal}

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  nat_cleanup
  rm -rf "$work"
}
trap cleanup EXIT
nat_up

ms() { date +%s%3N; }
sh_in() { local ns=$1 home=$2; shift 2; ip netns exec "$ns" "$SHOAL_BIN" --home "$home" "$@"; }
wait_until() {
  local what=$1; shift
  local deadline=$((SECONDS + TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { echo "relay bench: timed out waiting for $what" >&2; exit 1; }
    sleep 0.02
  done
}
start() { # ns home listen_ip [--peer addr]
  local ns=$1 home=$2 ip=$3; shift 3
  ip netns exec "$ns" "$SHOAL_BIN" --home "$home" --json up \
    --listen "/ip4/$ip/tcp/4747" "$@" >"$home.out" 2>"$home.log" &
  pids+=($!)
}
stop_nodes() {
  for p in "${pids[@]:1}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  pids=("${pids[0]}")
}
dev_id() { sh_in "$1" "$2" --json id | sed -n 's/.*"device_id":"\([^"]*\)".*/\1/p'; }
# A shares space s with B by grant; no addresses change hands.
share() { # nsA A nsB B
  sh_in "$1" "$2" space create s >/dev/null
  sh_in "$1" "$2" member s "$(dev_id "$3" "$4")" --name b >/dev/null
  sh_in "$1" "$2" space grant s --out "$work/grant" >/dev/null
  sh_in "$3" "$4" space import "$work/grant" >/dev/null
}

ip netns exec "$ns_pub" "$SHOAL_BIN" --home "$work/relay" --json relay --autonat-private \
  --listen /ip4/10.90.0.1/tcp/4001 >"$work/relay.out" 2>"$work/relay.log" &
pids+=($!)
wait_until "the relay" grep -q peer_id "$work/relay.out"
relay=$(sed -n 's/.*"addrs":\["\([^"]*\)".*/\1/p' "$work/relay.out")

# 1. First document, RUNS times with fresh homes.
total=(); after=()
for r in $(seq 1 "$RUNS"); do
  A="$work/r$r-a"; B="$work/r$r-b"
  nat_device_home "$ns_dev1" "$A" "$relay"
  nat_device_home "$ns_dev2" "$B" "$relay"
  t0=$(ms)
  start "$ns_dev1" "$A" 0.0.0.0
  start "$ns_dev2" "$B" 0.0.0.0
  wait_until "A up" test -s "$A.out"
  wait_until "B up" test -s "$B.out"
  sh_in "$ns_dev1" "$A" space create s >/dev/null
  sh_in "$ns_dev1" "$A" doc put s first /hello '"world"' >/dev/null
  sh_in "$ns_dev1" "$A" member s "$(dev_id "$ns_dev2" "$B")" --name b >/dev/null
  sh_in "$ns_dev1" "$A" space grant s --out "$work/grant" >/dev/null
  t1=$(ms)
  sh_in "$ns_dev2" "$B" space import "$work/grant" >/dev/null
  got() { sh_in "$ns_dev2" "$B" doc get s first | grep -q world; }
  wait_until "the first document on B" got
  t2=$(ms)
  total+=($((t2 - t0))); after+=($((t2 - t1)))
  stop_nodes
done

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# 2. A file through the relay (hole punching off) and directly.
transfer() { # label nsA A ipA nsB B ipB extra-config [peer-for-B]
  local label=$1 nsa=$2 A=$3 ipa=$4 nsb=$5 B=$6 ipb=$7 extra=$8
  nat_device_home "$nsa" "$A" "$relay" "$extra"
  nat_device_home "$nsb" "$B" "$relay" "$extra"
  mkdir -p "$A.dir" "$B.dir"
  start "$nsa" "$A" "$ipa"
  wait_until "A up" test -s "$A.out"
  if [ "$label" = direct ]; then
    local a_addr="/ip4/$ipa/tcp/4747/p2p/$(dev_id "$nsa" "$A")"
    start "$nsb" "$B" "$ipb" --peer "$a_addr"
  else
    start "$nsb" "$B" "$ipb"
  fi
  wait_until "B up" test -s "$B.out"
  share "$nsa" "$A" "$nsb" "$B"
  sh_in "$nsa" "$A" folder attach s "$A.dir" >/dev/null
  sh_in "$nsb" "$B" folder attach s "$B.dir" >/dev/null
  head -c $((MIB << 20)) /dev/urandom >"$work/payload"
  local t0; t0=$(ms)
  cp "$work/payload" "$A.dir/big.bin"
  same() { cmp -s "$work/payload" "$B.dir/big.bin"; }
  wait_until "$label transfer" same
  local t=$(( $(ms) - t0 ))
  local path; path=$(sh_in "$nsb" "$B" --json peers | grep -o '"relayed":[a-z]*' | sort -u | tr '\n' ' ')
  stop_nodes
  echo "$t $path"
}
relayed=$(transfer relayed "$ns_dev1" "$work/xa" 0.0.0.0 "$ns_dev2" "$work/xb" 0.0.0.0 "hole_punch = false")
direct=$(transfer direct "$ns_d1" "$work/ya" 10.90.0.21 "$ns_d2" "$work/yb" 10.90.0.22 "hole_punch = false")
rt=${relayed%% *}; dt=${direct%% *}
mbps() { awk -v b=$((MIB << 20)) -v t="$1" 'BEGIN {printf "%.0f", b / 1e6 / (t / 1000)}'; }

echo
echo "## relay benchmark ($(date -u +%Y-%m-%d), $(nproc) cores, namespaces on veth; both devices behind MASQUERADE NATs)"
echo
echo "| measure | value |"
echo "|---|---:|"
echo "| first document, launch of two fresh nodes -> on B, p50 of $RUNS (ms) | $(median "${total[@]}") |"
echo "| first document, B imports the space -> on B, p50 of $RUNS (ms) | $(median "${after[@]}") |"
echo "| first document, launch -> on B, min / max (ms) | $(printf '%s\n' "${total[@]}" | sort -n | head -1) / $(printf '%s\n' "${total[@]}" | sort -n | tail -1) |"
echo "| $MIB MiB file, relayed (s, MB/s) | $(awk -v t="$rt" 'BEGIN{printf "%.2f", t/1000}') ($(mbps "$rt")) |"
echo "| $MIB MiB file, direct (s, MB/s) | $(awk -v t="$dt" 'BEGIN{printf "%.2f", t/1000}') ($(mbps "$dt")) |"
echo "| relayed / direct time | $(awk -v a="$rt" -v b="$dt" 'BEGIN{printf "%.2fx", a/b}') |"
echo
echo "(paths seen by B: relayed run: ${relayed#* }; direct run: ${direct#* })"
