#!/bin/sh
# clb VIP hook: Hetzner Cloud floating IP. Not tested in CI (no Hetzner project there).
#
#   clbd --vip 203.0.113.10 --vip-interface eth0 \
#        --vip-hook /etc/clb/hooks/hetzner-floating-ip.sh
#
# Called as: hetzner-floating-ip.sh claim|release VIP NODE_ID TERM
# Needs:
#   - the hcloud CLI and iproute2; root or CAP_NET_ADMIN (the floating IP must also be
#     configured on the interface: Hetzner routes it, the host must accept it);
#   - HCLOUD_TOKEN: a project API token with read & write permission (keep it in
#     clbd's environment file, mode 0600);
#   - CLB_HCLOUD_FLOATING_IP (name or id) and CLB_HCLOUD_SERVER (this server's name
#     or id).
# `hcloud floating-ip assign` moves the address atomically; release only unassigns
# it when it is assigned to this server.
set -eu
action=$1 vip=$2
: "${HCLOUD_TOKEN:?}" "${CLB_HCLOUD_FLOATING_IP:?}" "${CLB_HCLOUD_SERVER:?}"
iface=${CLB_INTERFACE:-eth0}
case "$vip" in *:*) cidr="$vip/128" ;; *) cidr="$vip/32" ;; esac
server_id=$(hcloud server describe "$CLB_HCLOUD_SERVER" -o format='{{.ID}}')
assigned=$(hcloud floating-ip describe "$CLB_HCLOUD_FLOATING_IP" -o format='{{if .Server}}{{.Server.ID}}{{end}}')
case "$action" in
claim)
    [ "$assigned" = "$server_id" ] || hcloud floating-ip assign "$CLB_HCLOUD_FLOATING_IP" "$server_id"
    ip addr add "$cidr" dev "$iface" 2>/dev/null || ip addr show dev "$iface" | grep -q " $cidr "
    ;;
release)
    ip addr del "$cidr" dev "$iface" 2>/dev/null || true
    [ "$assigned" != "$server_id" ] || hcloud floating-ip unassign "$CLB_HCLOUD_FLOATING_IP"
    ;;
*) echo "usage: $0 claim|release VIP NODE_ID TERM" >&2; exit 2 ;;
esac
