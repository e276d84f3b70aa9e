#!/usr/bin/env bash
# A small internet in network namespaces, for testing nodes behind NATs on one machine.
#
#   natlab.sh up PREFIX      make it (needs root, iproute2 and nftables)
#   natlab.sh down PREFIX    remove it (also what `up` left half made)
#
# What `up` makes, every namespace named PREFIX-<host>:
#
#   wan     a bridge, the "public internet" 10.77.0.0/24
#   relay   a public host at 10.77.0.10
#   pub     a second public host at 10.77.0.11
#   pub2    a third public host at 10.77.0.12
#   rN      for N = 1, 2, 3: a home router, 10.77.0.N on the internet and 192.168.N.1 at home,
#           masquerading (Linux's NAT: the same outside port for one inside port whatever the
#           destination, inbound packets only in answer to what went out, the rest dropped
#           without a word: a port-restricted cone NAT, which hole punching gets through)
#   hN      a host behind router N at 192.168.N.2; nothing outside can open a connection to it
#
# `ip netns exec PREFIX-h1 COMMAND` then runs COMMAND on that host.
set -euo pipefail

usage() {
  echo "usage: $0 up|down PREFIX" >&2
  exit 2
}
[ $# -eq 2 ] || usage
action=$1
p=$2
[[ $p =~ ^[a-z][a-z0-9]{0,7}$ ]] || { echo "PREFIX must be 1-8 lowercase letters and digits" >&2; exit 2; }
hosts=(wan relay pub pub2 r1 r2 r3 h1 h2 h3)

down() {
  for h in "${hosts[@]}"; do
    ip netns del "$p-$h" 2>/dev/null || true
  done
}

in_ns() {
  local ns=$1
  shift
  ip netns exec "$p-$ns" "$@"
}

up() {
  for tool in ip nft; do
    command -v "$tool" >/dev/null || { echo "natlab: $tool is missing (apt-get install iproute2 nftables)" >&2; exit 1; }
  done
  down
  for h in "${hosts[@]}"; do
    ip netns add "$p-$h"
    in_ns "$h" ip link set lo up
  done
  in_ns wan ip link add br0 type bridge
  in_ns wan ip link set br0 up

  # A host on the internet: one leg in the bridge, its end named wan0.
  public() {
    local host=$1 addr=$2
    ip link add "to-$host" netns "$p-wan" type veth peer name wan0 netns "$p-$host"
    in_ns wan ip link set "to-$host" master br0 up
    in_ns "$host" ip addr add "$addr/24" dev wan0
    in_ns "$host" ip link set wan0 up
  }
  public relay 10.77.0.10
  public pub 10.77.0.11
  public pub2 10.77.0.12

  for n in 1 2 3; do
    public "r$n" "10.77.0.$n"
    ip link add lan0 netns "$p-r$n" type veth peer name eth0 netns "$p-h$n"
    in_ns "r$n" ip addr add "192.168.$n.1/24" dev lan0
    in_ns "r$n" ip link set lan0 up
    in_ns "h$n" ip addr add "192.168.$n.2/24" dev eth0
    in_ns "h$n" ip link set eth0 up
    in_ns "h$n" ip route add default via "192.168.$n.1"
    in_ns "r$n" sysctl -qw net.ipv4.ip_forward=1
    in_ns "r$n" nft -f - <<'EOF'
table ip nat {
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan0" masquerade
  }
}
table inet filter {
  chain input {
    type filter hook input priority filter; policy drop;
    ct state established,related accept
    iifname { "lo", "lan0" } accept
  }
  chain forward {
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname "lan0" oifname "wan0" accept
  }
}
EOF
  done
}

case $action in
  up) up ;;
  down) down ;;
  *) usage ;;
esac
