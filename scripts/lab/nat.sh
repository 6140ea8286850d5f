#!/usr/bin/env bash
# Two devices behind two NATs (iptables MASQUERADE), each with only a relay
# in its config (`shoal config bootstrap add`), meet through `shoal relay` in
# a "public" namespace: A holds a relay reservation, B joins A's space with
# an invite code (whose only reachable address is A's relayed one), then a
# document change and a file cross from A to B. The script reports whether
# DCUtR hole punching got a direct connection. All traffic stays inside
# namespaces this script creates (see natnet.sh). Exit 0 on success, 1 on
# failure, 77 when it cannot run here (not root, no netns, no iptables).
#
# usage: scripts/lab/nat.sh            (SHOAL_BIN=path/to/shoal to override)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
SHOAL_BIN=${SHOAL_BIN:-$root/target/debug/shoal}
TIMEOUT=${LAB_TIMEOUT:-45}
# shellcheck source=natnet.sh
. "$here/natnet.sh"

skip() { echo "nat lab: SKIP: $*"; exit 77; }
why=$(nat_skip_reason); [ -z "$why" ] || skip "$why"
[ -x "$SHOAL_BIN" ] || { echo "nat lab: $SHOAL_BIN missing; build with cargo build -p shoal-cli" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  nat_cleanup
  rm -rf "$work"
}
trap cleanup EXIT
nat_up || skip "cannot create network namespaces here"

fail() {
  echo "nat lab: FAIL: $*"
  for f in "$work"/*.log; do echo "--- $f"; tail -15 "$f"; done
  exit 1
}
wait_until() { # description, command...
  local what=$1; shift
  local deadline=$((SECONDS + TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || fail "timed out waiting for $what"
    sleep 0.2
  done
}
sh_in() { local ns=$1 home=$2; shift 2; ip netns exec "$ns" "$SHOAL_BIN" --home "$home" "$@"; }

# The relay, on the "public" side.
ip netns exec "$ns_pub" "$SHOAL_BIN" --home "$work/relay" --json relay --autonat-private \
  --listen /ip4/10.90.0.1/tcp/4001 --listen /ip4/10.90.0.1/udp/4001/quic-v1 \
  >"$work/relay.out" 2>"$work/relay.log" &
pids+=($!)
wait_until "the relay" grep -q peer_id "$work/relay.out"
relay=$(sed -n 's/.*"addrs":\["\([^"]*tcp[^"]*\)".*/\1/p' "$work/relay.out")
[ -n "$relay" ] || fail "no relay address in $(cat "$work/relay.out")"
echo "nat lab: relay at $relay ($(sed -n 's/.*"kad_protocol":"\([^"]*\)".*/\1/p' "$work/relay.out"))"

A="$work/a"; B="$work/b"
nat_device_home "$ns_dev1" "$A" "$relay"
nat_device_home "$ns_dev2" "$B" "$relay"
start() { # ns home
  ip netns exec "$1" "$SHOAL_BIN" --home "$2" --json up \
    --listen /ip4/0.0.0.0/tcp/4747 --listen /ip4/0.0.0.0/udp/4747/quic-v1 \
    >"$2.out" 2>"$2.log" &
  pids+=($!)
}
start "$ns_dev1" "$A"
start "$ns_dev2" "$B"
wait_until "node A" test -s "$A.out"
wait_until "node B" test -s "$B.out"

reserved() { sh_in "$1" "$2" --json doctor | grep -q '"accepted":true'; }
wait_until "A's relay reservation" reserved "$ns_dev1" "$A"
echo "nat lab: A reachability: $(sh_in "$ns_dev1" "$A" --json doctor | sed -n 's/.*"reachability":"\([a-z]*\)".*/\1/p')"

mkdir -p "$work/fa" "$work/fb"
sh_in "$ns_dev1" "$A" space create lab --folder "$work/fa" >/dev/null
code=$(sh_in "$ns_dev1" "$A" --json invite lab --role editor --expires 10m | sed -n 's/.*"code":"\([^"]*\)".*/\1/p')
[ -n "$code" ] || fail "no invite code"
t0=$(date +%s%3N)
sh_in "$ns_dev2" "$B" join "$code" --folder "$work/fb" --timeout "${TIMEOUT}s" >"$work/join.log" 2>&1 \
  || fail "B could not join through the relay: $(cat "$work/join.log")"
echo "nat lab: B joined A's space through the relay in $(( $(date +%s%3N) - t0 )) ms"

t0=$(date +%s%3N)
sh_in "$ns_dev1" "$A" doc put lab todo /msg '"hello across two NATs"' >/dev/null
got_doc() { sh_in "$ns_dev2" "$B" doc get lab todo | grep -q "hello across two NATs"; }
wait_until "the document change on B" got_doc
echo "nat lab: a document change crossed in $(( $(date +%s%3N) - t0 )) ms"

t0=$(date +%s%3N)
head -c 3000000 /dev/urandom >"$work/fa/photo.bin"
same() { cmp -s "$work/fa/photo.bin" "$work/fb/photo.bin"; }
wait_until "the file on B" same
echo "nat lab: a 3 MB file crossed in $(( $(date +%s%3N) - t0 )) ms"

a_id=$(sh_in "$ns_dev1" "$A" --json id | sed -n 's/.*"device_id":"\([^"]*\)".*/\1/p')
# Give hole punching its chance to finish (it starts with the relayed
# connection), then report which path B uses now.
direct() { sh_in "$ns_dev2" "$B" --json peers | grep -o "{[^{}]*\"$a_id\"[^{}]*}" | grep -q '"relayed":false'; }
if ( TIMEOUT=10; wait_until "a direct path" direct ) >/dev/null 2>&1; then
  path="direct: DCUtR hole punching succeeded"
else
  path="relayed: DCUtR did not get a direct connection"
fi
[ -z "${KEEP_LOGS:-}" ] || { grep -h "libp2p_dcutr\|hole punch" "$A.log" "$B.log" | tail -8; }
echo "nat lab: PASS: two devices behind NATs met through the relay and synced a document and a file; path now $path"
