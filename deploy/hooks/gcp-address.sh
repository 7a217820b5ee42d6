#!/bin/sh
# clb VIP hook: GCP static external IP on the balancer's nic0. Not tested in CI (no
# GCP project there).
#
#   clbd --vip 203.0.113.10 --vip-hook /etc/clb/hooks/gcp-address.sh
#
# Called as: gcp-address.sh claim|release VIP NODE_ID TERM
# Needs:
#   - gcloud and curl on the balancer;
#   - the VM's service account with compute.instances.addAccessConfig,
#     compute.instances.deleteAccessConfig, compute.instances.get,
#     compute.addresses.get and compute.addresses.use (e.g. a custom role), and the
#     VM's access scope allowing the Compute API;
#   - CLB_GCP_ADDRESS_NAME (the reserved address's name) and CLB_GCP_REGION.
# GCP cannot re-attach an external IP atomically: claim first detaches it from
# whichever VM has it, then attaches it here (a short gap); release only detaches it
# from this VM.
set -eu
action=$1 vip=$2
: "${CLB_GCP_ADDRESS_NAME:?}" "${CLB_GCP_REGION:?}"
md=http://metadata.google.internal/computeMetadata/v1/instance
me=$(curl -sf -m 2 -H 'Metadata-Flavor: Google' "$md/name")
zone=$(curl -sf -m 2 -H 'Metadata-Flavor: Google' "$md/zone" | sed 's|.*/||')
detach() { # instance-url
    inst=$(echo "$1" | sed 's|.*/instances/||')
    izone=$(echo "$1" | sed 's|.*/zones/||; s|/.*||')
    gcloud compute instances delete-access-config "$inst" --zone "$izone" \
        --network-interface nic0 --access-config-name external-nat --quiet || true
}
user=$(gcloud compute addresses describe "$CLB_GCP_ADDRESS_NAME" --region "$CLB_GCP_REGION" \
    --format 'value(users[0])')
case "$action" in
claim)
    case "$user" in
    */instances/"$me") exit 0 ;;
    "") ;;
    *) detach "$user" ;;
    esac
    # An ephemeral address may hold the access config slot.
    gcloud compute instances delete-access-config "$me" --zone "$zone" \
        --network-interface nic0 --access-config-name external-nat --quiet 2>/dev/null || true
    gcloud compute instances add-access-config "$me" --zone "$zone" \
        --network-interface nic0 --access-config-name external-nat --address "$vip"
    ;;
release)
    case "$user" in */instances/"$me") detach "$user" ;; esac
    ;;
*) echo "usage: $0 claim|release VIP NODE_ID TERM" >&2; exit 2 ;;
esac
