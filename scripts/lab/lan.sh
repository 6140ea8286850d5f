#!/usr/bin/env bash
# A small LAN of network namespaces on a bridge: two devices, A and B, run
# `shoal up` with mDNS ON and no --peer. A issues an invite code and then
# restarts on another port, so the address inside the code is stale; B joins
# with the code and must find A on the LAN by mDNS; then a document change
# made on A must appear on B. All traffic stays inside namespaces this
# script creates; mDNS runs only there. Needs root and iproute2. Exit 0 on success, 1 on failure, 77 when
# it cannot run here (not root, no netns support).
#
# usage: scripts/lab/lan.sh            (SHOAL_BIN=path/to/shoal to override)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
SHOAL_BIN=${SHOAL_BIN:-$root/target/debug/shoal}
TIMEOUT=${LAB_TIMEOUT:-30}

skip() { echo "lan lab: SKIP: $*"; exit 77; }
[ "$(id -u)" = 0 ] || skip "needs root (ip netns)"
command -v ip >/dev/null || skip "needs iproute2 (ip)"
[ -x "$SHOAL_BIN" ] || { echo "lan lab: $SHOAL_BIN missing; build with cargo build -p shoal-cli" >&2; exit 1; }

tag="sl$$"
br="${tag}br"; na="${tag}a"; nb="${tag}b"
work=$(mktemp -d)
pids=()

cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for n in "$na" "$nb" "$br"; do ip netns del "$n" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

ip netns add "$br" 2>/dev/null || skip "cannot create network namespaces here"
ip netns add "$na"; ip netns add "$nb"
ip -n "$br" link add br0 type bridge
ip -n "$br" link set br0 up
i=1
for n in "$na" "$nb"; do
  ip link add "v$i" netns "$n" type veth peer name "p$i" netns "$br"
  ip -n "$br" link set "p$i" master br0 up
  ip -n "$n" addr add "10.231.0.$i/24" dev "v$i"
  ip -n "$n" link set "v$i" up
  ip -n "$n" link set lo up
  # mDNS needs a multicast route on the LAN link
  ip -n "$n" route add 224.0.0.0/4 dev "v$i" 2>/dev/null || true
  i=$((i + 1))
done

sh_in() { local ns=$1 home=$2; shift 2; ip netns exec "$ns" "$SHOAL_BIN" --home "$home" "$@"; }

start() { # ns home ip [port]
  [ -e "$2/identity.key" ] || sh_in "$1" "$2" init --name "$(basename "$2")" >/dev/null
  rm -f "$2.out"
  ip netns exec "$1" "$SHOAL_BIN" --home "$2" --json up --listen "/ip4/$3/tcp/${4:-4747}" \
    >"$2.out" 2>>"$2.log" &
  pids+=($!)
  last_pid=$!
}

wait_until() { # description, command...
  local what=$1; shift
  local deadline=$((SECONDS + TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then echo "lan lab: FAIL: timed out waiting for $what" >&2; return 1; fi
    sleep 0.1
  done
}

A="$work/a"; B="$work/b"
start "$na" "$A" 10.231.0.1
last_a=$last_pid
start "$nb" "$B" 10.231.0.2
wait_until "node A" test -s "$A.out"
wait_until "node B" test -s "$B.out"

a_id=$(sh_in "$na" "$A" --json id | sed -n 's/.*"device_id":"\([^"]*\)".*/\1/p')
sh_in "$na" "$A" space create lab >/dev/null
code=$(sh_in "$na" "$A" --json invite lab --role editor --expires 10m | sed -n 's/.*"code":"\([^"]*\)".*/\1/p')
[ -n "$code" ] || { echo "lan lab: FAIL: no invite code" >&2; exit 1; }

# A moves to another port: the address in the code is now stale.
kill "$last_a"; wait "$last_a" 2>/dev/null || true
start "$na" "$A" 10.231.0.1 4848
wait_until "node A to come back" test -s "$A.out"

# Nobody was told where A is now: mDNS must find it.
join_start=$(date +%s%3N)
if ! sh_in "$nb" "$B" join "$code" --timeout "${TIMEOUT}s" >"$work/join.out" 2>&1; then
  echo "lan lab: FAIL: join with a stale code did not find the inviter"; cat "$work/join.out"
  echo "--- B log"; tail -20 "$B.log"; exit 1
fi
echo "lan lab: joined with a stale-address code in $(( $(date +%s%3N) - join_start )) ms: $(cat "$work/join.out")"

found() { sh_in "$nb" "$B" peers --json 2>/dev/null | grep -q "$a_id"; }
wait_until "B to see A" found || { echo "--- B log"; tail -20 "$B.log"; exit 1; }

start_ms=$(date +%s%3N)
sh_in "$na" "$A" doc put lab todo /msg '"hello over the LAN"' >/dev/null
check() { ip netns exec "$nb" "$SHOAL_BIN" --home "$B" doc get lab todo 2>/dev/null | grep -q "hello over the LAN"; }
wait_until "the change to reach B" check || { echo "--- A log"; tail -20 "$A.log"; echo "--- B log"; tail -20 "$B.log"; exit 1; }
end_ms=$(date +%s%3N)
echo "lan lab: PASS: mDNS found the inviter behind a stale code, and a document change crossed the LAN in $((end_ms - start_ms)) ms"
