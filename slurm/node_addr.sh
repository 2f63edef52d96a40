#!/usr/bin/env bash
# Print the address other nodes reach NODE at: its NodeAddr in SLURM's node table (where the site sets none,
# SLURM reports the node name itself). Used instead of resolving node names, which on many clusters resolve
# to a management network, or not at all, on the training network.
#
#   slurm/node_addr.sh NODE
set -euo pipefail
node=${1:?usage: slurm/node_addr.sh NODE}
addr=$(scontrol show node "$node" --oneliner 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2 || true)
echo "${addr:-$node}"
