#!/usr/bin/env bash
# Start SparK pre-training on this node with torchrun (torch.distributed.run).
#
#   bash run.sh <exp_name> [--num_nodes=N] [--ngpu_per_node=G] [--node_rank=R]
#               [--master_address=ADDR] [--master_port=PORT] [--key=value ...]
#
# Every option other than the five launcher options passes through to main.py
# (see `bash run.sh --help`). --ngpu_per_node is the number of processes on this
# node: one per GPU (default: all GPUs), or on a machine with no GPU the number of
# CPU processes (default 1). Outputs go to output_<exp_name> in the current
# directory, or to --exp_dir when it is given.
set -euo pipefail

repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
usage="usage: bash run.sh <exp_name> [--num_nodes=N] [--ngpu_per_node=G] [--node_rank=R] [--master_address=ADDR] [--master_port=PORT] [--key=value ...]"

fail() {
  echo "run.sh: error: $1" >&2
  exit 2
}

# Check that option $1 has a whole-number value $2 of at least $3.
check_count() {
  [[ "$2" =~ ^[0-9]+$ ]] && [ "$2" -ge "$3" ] || fail "invalid $1 '$2'; use a whole number of at least $3"
}

if [ $# -lt 1 ]; then
  fail "missing the experiment name; $usage"
fi
case "$1" in
  -h | --help)
    echo "$usage"
    source "$repo_dir/.ci/env.sh"
    exec "$PYTHON" "$repo_dir/main.py" --help
    ;;
  -*) fail "the first argument must be the experiment name, got '$1'; $usage" ;;
esac
exp_name="$1"
shift

num_nodes=1
ngpu_per_node=""
node_rank=0
master_address=""
master_port=29500
trainer_args=()
for arg in "$@"; do
  case "$arg" in
    --num_nodes=*) num_nodes="${arg#*=}" ;;
    --ngpu_per_node=*) ngpu_per_node="${arg#*=}" ;;
    --node_rank=*) node_rank="${arg#*=}" ;;
    --master_address=*) master_address="${arg#*=}" ;;
    --master_port=*) master_port="${arg#*=}" ;;
    --exp_name=*) fail "give the experiment name as the first argument, not as $arg" ;;
    *) trainer_args+=("$arg") ;;
  esac
done

if [ -z "$ngpu_per_node" ]; then
  ngpu_per_node=1
  if command -v nvidia-smi >/dev/null 2>&1 && gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')" && [ "$gpus" -gt 0 ]; then
    ngpu_per_node="$gpus"
  fi
fi
check_count --num_nodes "$num_nodes" 1
check_count --ngpu_per_node "$ngpu_per_node" 1
check_count --node_rank "$node_rank" 0
check_count --master_port "$master_port" 1
if [ "$node_rank" -ge "$num_nodes" ]; then
  fail "--node_rank $node_rank is not below --num_nodes $num_nodes; number the nodes 0 to $((num_nodes - 1))"
fi
if [ "$num_nodes" -gt 1 ] && [ -z "$master_address" ]; then
  fail "--num_nodes $num_nodes needs --master_address, the address of node 0 that every node can reach"
fi

# shellcheck source=.ci/env.sh
source "$repo_dir/.ci/env.sh" || exit 1
export PYTHONPATH="$repo_dir${PYTHONPATH:+:$PYTHONPATH}"

# Reject bad options here, in one line, before torchrun starts processes.
"$PYTHON" -m spark_sparse.trainer.validate --world_size="$((num_nodes * ngpu_per_node))" \
  --exp_name="$exp_name" ${trainer_args[@]+"${trainer_args[@]}"}

# The wrapper runs torchrun and ends a failed job with one line instead of a traceback.
launcher=("$PYTHON" -m spark_sparse.trainer.launch --nnodes="$num_nodes" --nproc_per_node="$ngpu_per_node")
if [ "$num_nodes" -eq 1 ] && [ -z "$master_address" ]; then
  # One node: torchrun picks a free port itself.
  launcher+=(--standalone)
else
  launcher+=(--node_rank="$node_rank" --master_addr="$master_address" --master_port="$master_port")
fi
exec "${launcher[@]}" "$repo_dir/main.py" --exp_name="$exp_name" ${trainer_args[@]+"${trainer_args[@]}"}
