#!/usr/bin/env bash
# Runs one sc_dpo_jax job on a SLURM GPU cluster, one process per GPU. Outside an allocation it submits itself
# with sbatch; inside one (the submitted job, or an salloc shell) it starts
#   srun --nodes=N --ntasks-per-node=G python3 -m sc_dpo_jax.main ARGS
# and jax.distributed.initialize() takes the process count, rank and coordinator from SLURM's variables.
# Usage: --help, launch/README.md. It can also be given to sbatch directly:
#   sbatch --nodes=2 --gpus-per-node=8 --ntasks-per-node=8 launch/gpu_slurm.sh -- --config=... --workdir=...
#SBATCH --job-name=sc_dpo_jax
set -euo pipefail

prog=launch/gpu_slurm.sh

usage() {
  cat <<EOF
Usage: $prog [--nodes N] [--gpus-per-node G] [options] -- \\
           --config=configs/<file>.py[:arg] --workdir=DIR [--config.key=value ...]

Outside a SLURM allocation: submits this script with sbatch for N nodes with G GPUs each, then returns.
Inside an allocation (\$SLURM_JOB_ID is set: the submitted job, or an salloc shell): runs
\`srun --nodes=N --ntasks-per-node=G ... python3 -m sc_dpo_jax.main ARGS\`, one process per GPU; JAX's SLURM
detection gives each process its rank and the GPU numbered \$SLURM_LOCALID. Everything after \`--\` is passed
to sc_dpo_jax.main unchanged (--config and --workdir are required; the workdir must be on a file system
that every node shares, or gs://). Paths are relative to the directory you start from, as with local.sh.

Resources
  --nodes N              number of nodes (default: 1, or the allocation's node count inside one)
  --gpus-per-node G      GPUs per node = processes per node (required when submitting; inside an
                         allocation defaults to \$SLURM_GPUS_ON_NODE)
  --cpus-per-task C      CPUs for each process (data loading); without it SLURM may give each only one
Submission (ignored inside an allocation)
  --partition P          sbatch --partition
  --time T               sbatch --time, e.g. 24:00:00
  --account A            sbatch --account
  --job-name J           sbatch --job-name (default: sc_dpo_jax)
  --sbatch-arg ARG       any other sbatch option, e.g. --sbatch-arg=--qos=high (repeatable)
  --submit               submit with sbatch even when already inside an allocation
  --repo-dir DIR         the sc_dpo_jax checkout whose launch/common.sh to load (first argument only);
                         the submission passes it, as SLURM runs a copy of this script from its spool
Running
  --python PY            Python with sc_dpo_jax and jax[cuda12] installed (default: python3 on PATH;
                         sbatch passes on your environment, so an activated virtualenv is used)
  --dry-run              print the sbatch and srun commands, one per line prefixed with '+ ', run nothing
                         (needs no SLURM)
  -h, --help             this text

Options also take the form --option=VALUE.

Example
  $prog --nodes 2 --gpus-per-node 8 --cpus-per-task 12 --partition gpu --time 24:00:00 -- \\
      --config=configs/sc_dpo.py:sd15 --workdir=/shared/runs/sc_dpo --config.train.steps=2000
EOF
}

# The shared helpers (die, shquote, shjoin, check_main_args, need_value, positive) are in launch/common.sh.
# SLURM runs a copy of this script from its spool directory, where common.sh is not beside it, so the
# submission below passes the checkout as the first arguments, `--repo-dir DIR`. Without them: common.sh
# beside this script (run from the checkout), else in $SLURM_SUBMIT_DIR/launch (`sbatch launch/gpu_slurm.sh`
# given by hand from the checkout). launch/README.md, "Shared helpers".
repo_dir='' given=0
case ${1:-} in
  --repo-dir) given=1; repo_dir=${2:-}; shift $(($# > 1 ? 2 : 1)) ;;
  --repo-dir=*) given=1; repo_dir=${1#*=}; shift ;;
esac
if ((given)); then
  places=(${repo_dir:+"$repo_dir/launch"})
else
  places=("$(dirname "${BASH_SOURCE[0]}")")
  [[ -z ${SLURM_SUBMIT_DIR:-} ]] || places+=("$SLURM_SUBMIT_DIR/launch")
fi
launch_dir=''
for place in ${places[@]+"${places[@]}"}; do
  if [[ -f $place/common.sh ]]; then launch_dir=$(cd "$place" && pwd); break; fi
done
if [[ -z $launch_dir ]]; then
  printf '%s: error: cannot find launch/common.sh, the launch scripts'"'"' helpers (looked in: %s).\n' "$prog" \
    "${places[*]:-an empty --repo-dir}" >&2
  printf '%s\n' "When sbatch runs a copy of this script, give the checkout as its first arguments:" \
    "  sbatch [options] /path/to/sc_dpo_jax/launch/gpu_slurm.sh --repo-dir /path/to/sc_dpo_jax -- ..." >&2
  exit 2
fi
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$launch_dir/common.sh"

# ---------------------------------------------------------------------------------------------- options
nodes='' gpus='' cpus='' partition='' time_limit='' account='' job_name=sc_dpo_jax python=python3
submit=0 dry_run=0 sbatch_extra=() main_args=() seen_separator=0 submission_opts=()

while (($#)); do
  arg=$1
  shift
  inline=0
  if [[ $arg == --*=* ]]; then
    set -- "${arg#*=}" "$@"
    arg=${arg%%=*}
    inline=1
  fi
  case $arg in
    --) seen_separator=1; main_args=("$@"); break ;;
    -h | --help) usage; exit 0 ;;
    --nodes) need_value "$arg" "$@"; positive "$arg" "$1"; nodes=$1; shift ;;
    --gpus-per-node) need_value "$arg" "$@"; positive "$arg" "$1"; gpus=$1; shift ;;
    --cpus-per-task) need_value "$arg" "$@"; positive "$arg" "$1"; cpus=$1; shift ;;
    --partition) need_value "$arg" "$@"; partition=$1; submission_opts+=("$arg"); shift ;;
    --time) need_value "$arg" "$@"; time_limit=$1; submission_opts+=("$arg"); shift ;;
    --account) need_value "$arg" "$@"; account=$1; submission_opts+=("$arg"); shift ;;
    --job-name) need_value "$arg" "$@"; job_name=$1; submission_opts+=("$arg"); shift ;;
    --sbatch-arg) need_value "$arg" "$@"; sbatch_extra+=("$1"); submission_opts+=("$arg"); shift ;;
    --python) need_value "$arg" "$@"; python=$1; shift ;;
    --submit | --dry-run)
      ((!inline)) || die "$arg takes no value"
      if [[ $arg == --submit ]]; then submit=1; else dry_run=1; fi ;;
    --repo-dir) die "--repo-dir must be the first argument (it says where launch/common.sh is)" ;;
    --config* | --workdir* | -config* | -workdir*)
      die "$arg is an argument of sc_dpo_jax.main: put it after -- (e.g. $prog --nodes 2 -- --config=...)" ;;
    *) die "unknown option '$arg'" ;;
  esac
done

((seen_separator)) || die "missing -- followed by the arguments for sc_dpo_jax.main (--config=... --workdir=...)"
check_main_args ${main_args[@]+"${main_args[@]}"}

# run CMD...: print CMD ('+ ' first; stdout for --dry-run, else stderr) and run it unless --dry-run.
run() {
  if ((dry_run)); then
    printf '+ %s\n' "$(shjoin "$@")"
    return 0
  fi
  printf '+ %s\n' "$(shjoin "$@")" >&2
  "$@"
}

# srun_command NODES GPUS: the job step, one process per GPU.
srun_command() {
  step=(srun --nodes="$1" --ntasks-per-node="$2" --gpus-per-node="$2")
  [[ -z $cpus ]] || step+=(--cpus-per-task="$cpus")
  # --gpu-bind=none: every process sees all the node's GPUs and JAX picks GPU $SLURM_LOCALID (a per-task
  # binding would leave process 3 with one GPU numbered 0). --kill-on-bad-exit: one failed process stops the
  # others instead of leaving them waiting in a collective forever. --label: output lines start with the rank.
  step+=(--gpu-bind=none --kill-on-bad-exit=1 --label "$python" -m sc_dpo_jax.main "${main_args[@]}")
}

if [[ -n ${SLURM_JOB_ID:-} ]] && ((!submit)); then
  # ---- inside an allocation: one job step over the nodes
  if ((${#submission_opts[@]})); then
    printf '%s: note: inside allocation %s, ignoring the submission options %s\n' \
      "$prog" "$SLURM_JOB_ID" "${submission_opts[*]}" >&2
  fi
  nodes=${nodes:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-}}}
  [[ -n $nodes ]] || die "inside allocation $SLURM_JOB_ID but \$SLURM_JOB_NUM_NODES is not set: pass --nodes N"
  if [[ -z $gpus ]]; then
    gpus=${SLURM_GPUS_ON_NODE:-}
    # SLURM_GPUS_PER_NODE reads like '8' or 'h100:8'.
    [[ -n $gpus || -z ${SLURM_GPUS_PER_NODE:-} ]] || gpus=${SLURM_GPUS_PER_NODE##*:}
  fi
  [[ $gpus =~ ^[1-9][0-9]*$ ]] || die "cannot tell how many GPUs allocation $SLURM_JOB_ID has per node (no \$SLURM_GPUS_ON_NODE): pass --gpus-per-node G"
  ((dry_run)) || command -v srun >/dev/null || die "srun not found although \$SLURM_JOB_ID is set; use --dry-run to see the command"
  srun_command "$nodes" "$gpus"
  run "${step[@]}"
  exit 0
fi

# ---- outside an allocation: submit this script, which then runs the step above inside the job
nodes=${nodes:-1}
[[ -n $gpus ]] || die "--gpus-per-node G is required to submit (the GPUs of each node; one process runs per GPU)"
self=$launch_dir/gpu_slurm.sh
batch=(sbatch --job-name="$job_name" --nodes="$nodes" --ntasks-per-node="$gpus" --gpus-per-node="$gpus")
[[ -z $cpus ]] || batch+=(--cpus-per-task="$cpus")
[[ -z $partition ]] || batch+=(--partition="$partition")
[[ -z $time_limit ]] || batch+=(--time="$time_limit")
[[ -z $account ]] || batch+=(--account="$account")
batch+=(${sbatch_extra[@]+"${sbatch_extra[@]}"})
inner=(--repo-dir "$(cd "$launch_dir/.." && pwd)" --nodes "$nodes" --gpus-per-node "$gpus")
[[ -z $cpus ]] || inner+=(--cpus-per-task "$cpus")
[[ $python == python3 ]] || inner+=(--python "$python")
batch+=("$self" "${inner[@]}" -- "${main_args[@]}")

((dry_run)) || command -v sbatch >/dev/null || die "sbatch not found: run this on a SLURM login node, or use --dry-run"
run "${batch[@]}"
if ((dry_run)); then
  srun_command "$nodes" "$gpus"
  printf '# then, inside the job:\n'
  run "${step[@]}"
fi
