#!/bin/sh
# clb VIP hook: AWS elastic IP. Not tested in CI (no AWS account there).
#
#   clbd --vip 203.0.113.10 --vip-hook /etc/clb/hooks/aws-eip.sh
#
# Called as: aws-eip.sh claim|release VIP NODE_ID TERM
# Needs:
#   - aws CLI v2 and curl on the balancer;
#   - credentials from the instance profile (an IAM role on the balancer), allowed
#     ec2:AssociateAddress, ec2:DisassociateAddress, ec2:DescribeAddresses on the
#     elastic IP; no keys on disk;
#   - CLB_EIP_ALLOCATION_ID=eipalloc-... in clbd's environment (AWS_REGION if the
#     CLI has no default region).
# claim re-associates atomically (--allow-reassociation), so the old holder needs no
# call; release only disassociates when the address is attached to this instance.
set -eu
action=$1
: "${CLB_EIP_ALLOCATION_ID:?set CLB_EIP_ALLOCATION_ID}"
imds=http://169.254.169.254/latest
token=$(curl -sf -m 2 -X PUT "$imds/api/token" -H 'X-aws-ec2-metadata-token-ttl-seconds: 60')
instance=$(curl -sf -m 2 -H "X-aws-ec2-metadata-token: $token" "$imds/meta-data/instance-id")
case "$action" in
claim)
    aws ec2 associate-address --allocation-id "$CLB_EIP_ALLOCATION_ID" \
        --instance-id "$instance" --allow-reassociation >/dev/null
    ;;
release)
    set -- $(aws ec2 describe-addresses --allocation-ids "$CLB_EIP_ALLOCATION_ID" \
        --query 'Addresses[0].[InstanceId,AssociationId]' --output text)
    if [ "${1:-}" = "$instance" ]; then
        aws ec2 disassociate-address --association-id "$2"
    fi
    ;;
*) echo "usage: $0 claim|release VIP NODE_ID TERM" >&2; exit 2 ;;
esac
