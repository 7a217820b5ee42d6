#!/bin/sh
# clb VIP hook: OpenStack (Neutron) floating IP. Not tested in CI (no cloud there).
#
#   clbd --vip 203.0.113.10 --vip-hook /etc/clb/hooks/openstack-floating-ip.sh
#
# Called as: openstack-floating-ip.sh claim|release VIP NODE_ID TERM
# Needs:
#   - python-openstackclient on the balancer;
#   - credentials in clouds.yaml (OS_CLOUD=name) or OS_* variables, ideally an
#     application credential restricted to the network API, allowed to update
#     floating IPs in the project;
#   - CLB_OS_PORT_ID: the Neutron port of this balancer's interface.
# Setting the floating IP's port re-associates it in one call; release only unsets
# it when it points at this balancer's port.
set -eu
action=$1 vip=$2
: "${CLB_OS_PORT_ID:?}"
port=$(openstack floating ip show "$vip" -f value -c port_id)
case "$action" in
claim)
    [ "$port" = "$CLB_OS_PORT_ID" ] || openstack floating ip set --port "$CLB_OS_PORT_ID" "$vip"
    ;;
release)
    [ "$port" != "$CLB_OS_PORT_ID" ] || openstack floating ip unset --port "$vip"
    ;;
*) echo "usage: $0 claim|release VIP NODE_ID TERM" >&2; exit 2 ;;
esac
