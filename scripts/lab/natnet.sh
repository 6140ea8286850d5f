# Sourced by scripts/lab/nat.sh and scripts/bench/relay.sh: a small internet
# of network namespaces. A "wan" bridge joins the relay's namespace (pub,
# 10.90.0.1) and two NAT routers (10.90.0.11 and .12); behind each NAT is a
# private LAN with one device (192.168.61.2 and 192.168.62.2) that reaches
# the wan only through iptables MASQUERADE. Two more namespaces sit on the
# wan itself (10.90.0.21 and .22) for direct runs. Nothing leaves these
# namespaces. Needs root, iproute2 and iptables.
#
# Sets: tag, ns_pub ns_nat1 ns_nat2 ns_dev1 ns_dev2 ns_d1 ns_d2 ns_wan, and
# nat_cleanup (call it on exit).

nat_skip_reason() {
  [ "$(id -u)" = 0 ] || { echo "needs root (ip netns)"; return; }
  command -v ip >/dev/null || { echo "needs iproute2 (ip)"; return; }
  command -v iptables >/dev/null || { echo "needs iptables (apt-get install iptables)"; return; }
  echo ""
}

nat_up() {
  tag="sn$$"
  ns_wan="${tag}w"; ns_pub="${tag}p"
  ns_nat1="${tag}n1"; ns_nat2="${tag}n2"
  ns_dev1="${tag}a"; ns_dev2="${tag}b"
  ns_d1="${tag}d1"; ns_d2="${tag}d2"
  ip netns add "$ns_wan" || return 1
  for n in "$ns_pub" "$ns_nat1" "$ns_nat2" "$ns_dev1" "$ns_dev2" "$ns_d1" "$ns_d2"; do
    ip netns add "$n"
    ip -n "$n" link set lo up
  done
  ip -n "$ns_wan" link add br0 type bridge
  ip -n "$ns_wan" link set br0 up
  local i=0 n addr
  for pair in "$ns_pub:10.90.0.1" "$ns_nat1:10.90.0.11" "$ns_nat2:10.90.0.12" \
              "$ns_d1:10.90.0.21" "$ns_d2:10.90.0.22"; do
    n=${pair%%:*}; addr=${pair#*:}; i=$((i + 1))
    ip link add "wan0" netns "$n" type veth peer name "w$i" netns "$ns_wan"
    ip -n "$ns_wan" link set "w$i" master br0 up
    ip -n "$n" addr add "$addr/24" dev wan0
    ip -n "$n" link set wan0 up
  done
  for k in 1 2; do
    local nat dev
    if [ $k = 1 ]; then nat=$ns_nat1; dev=$ns_dev1; else nat=$ns_nat2; dev=$ns_dev2; fi
    ip link add "lan0" netns "$nat" type veth peer name "lan0" netns "$dev"
    ip -n "$nat" addr add "192.168.6$k.1/24" dev lan0
    ip -n "$nat" link set lan0 up
    ip -n "$dev" addr add "192.168.6$k.2/24" dev lan0
    ip -n "$dev" link set lan0 up
    ip -n "$dev" route add default via "192.168.6$k.1"
    ip netns exec "$nat" sysctl -qw net.ipv4.ip_forward=1
    ip netns exec "$nat" iptables -t nat -A POSTROUTING -o wan0 -j MASQUERADE
    # Like a home router: unsolicited packets from the wan are dropped
    # silently (not answered with a reset), which is what hole punching
    # relies on.
    ip netns exec "$nat" iptables -A INPUT -i wan0 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
    ip netns exec "$nat" iptables -A INPUT -i wan0 -j DROP
  done
}

nat_cleanup() {
  for n in "$ns_pub" "$ns_nat1" "$ns_nat2" "$ns_dev1" "$ns_dev2" "$ns_d1" "$ns_d2" "$ns_wan"; do
    [ -n "$n" ] && ip netns del "$n" 2>/dev/null || true
  done
}

# A fresh device home in namespace $1 at $2 that knows only the relay $3.
# $4: extra config lines (e.g. "hole_punch = false").
nat_device_home() {
  local ns=$1 home=$2 relay=$3 extra=${4:-}
  ip netns exec "$ns" "$SHOAL_BIN" --home "$home" init --name "$(basename "$home")" >/dev/null
  ip netns exec "$ns" "$SHOAL_BIN" --home "$home" config bootstrap add "$relay" >/dev/null
  sed -i -e 's/^mdns = true/mdns = false/' \
         -e 's/^autonat_only_global = true/autonat_only_global = false/' "$home/config.toml"
  if [ -n "$extra" ]; then
    local key
    while IFS= read -r line; do
      key=${line%% =*}
      sed -i "/^$key = /d" "$home/config.toml"
      # Top-level keys must come before any table.
      sed -i "1i $line" "$home/config.toml"
    done <<<"$extra"
  fi
}
