#!/usr/bin/env bash
# Runs one sc_dpo_jax job on every worker of a Cloud TPU VM slice: creates the TPU VM (or reuses it), ships
# this checkout's HEAD (or clones --repo) to every worker, installs it with jax[tpu], starts the same
# `python -m sc_dpo_jax.main ...` on all workers at once (jax.distributed.initialize finds the slice by
# itself) and streams their output to this terminal and to a local log file. Usage: --help, launch/README.md.
set -euo pipefail

prog=launch/tpu_pod.sh
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<EOF
Usage: $prog --name NAME --zone ZONE --accelerator-type TYPE [options] -- \\
           --config=configs/<file>.py[:arg] --workdir=gs://BUCKET/DIR [--config.key=value ...]

Runs \`python -m sc_dpo_jax.main ARGS\` on every worker of the Cloud TPU VM NAME, creating it first when it
does not exist. Everything after \`--\` is passed to sc_dpo_jax.main unchanged (--config and --workdir are
required there; the workdir is normally a gs:// path that every worker can write).

TPU VM
  --name NAME              TPU VM name (required)
  --zone ZONE              zone, e.g. us-central2-b (required)
  --accelerator-type TYPE  e.g. v4-32, v5litepod-16, v5p-64, v6e-16 (required; must match an existing VM)
  --version VERSION        TPU software (runtime) version, also --runtime-version; default from TYPE:
                           tpu-ubuntu2204-base (v2-v4), v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5 (v5p),
                           v2-alpha-tpuv6e (v6e)
  --project PROJECT        Google Cloud project (default: the one gcloud is configured with)
  --spot                   create a Spot VM
  --preemptible            create a preemptible VM
  --recreate               delete and recreate an existing VM that is not READY (e.g. PREEMPTED)
  --delete-after           delete the TPU VM when the run ends, whether it succeeded, failed or was stopped

Code and installation
  --repo URL               git clone URL on every worker instead of copying this checkout
  --ref REF                commit, branch or tag to ship (default: HEAD of this checkout, or the clone's
                           default branch with --repo); uncommitted changes are never shipped
  --remote-dir DIR         code directory on each worker, under the home directory (default: sc_dpo_jax)
  --jax-extra EXTRA        install jax[EXTRA] with the package (default: tpu; 'none' installs no extra)
  --python PY              Python interpreter on the workers (default: python3)
  --venv DIR               create (once) and use a virtualenv at ~/DIR on the workers
  --no-copy                do not ship the code (it is already on the workers)
  --no-install             do not pip install (already installed; the install is editable)
  --env KEY=VALUE          environment variable for sc_dpo_jax.main on every worker (repeatable)

Running
  --log FILE               local log file (default: workdir/launch_logs/tpu_pod-NAME-<UTC time>.log in the repo)
  --kill                   stop sc_dpo_jax.main on every worker and exit (no arguments after --)
  --dry-run                print every command, one per line prefixed with '+ ', and run nothing
                           (needs neither gcloud nor git)
  -h, --help               this text

Options also take the form --option=VALUE.

Example
  $prog --name sc-dpo-v4 --zone us-central2-b --accelerator-type v4-32 --spot -- \\
      --config=configs/sc_dpo.py:sd15 --workdir=gs://my-bucket/runs/sc_dpo_v4 --config.train.steps=2000
EOF
}

# The shared helpers: die, shquote, shjoin, check_main_args, need_value, positive.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$root/launch/common.sh"

dry_run=0
log_file=''

note() {
  printf '%s: %s\n' "$prog" "$*" >&2
  if [[ -n $log_file ]] && ((!dry_run)); then printf '%s: %s\n' "$prog" "$*" >>"$log_file"; fi
}

# run CMD...: print CMD (stdout for --dry-run, else stderr and the log); run it unless --dry-run.
run() {
  if ((dry_run)); then
    printf '+ %s\n' "$(shjoin "$@")"
    return 0
  fi
  note "+ $(shjoin "$@")"
  "$@"
}

# run_logged CMD...: as run, and CMD's output (stdout and stderr) also goes to the log file.
run_logged() {
  if ((dry_run)); then
    printf '+ %s 2>&1 | tee -a %s\n' "$(shjoin "$@")" "$(shquote "$log_file")"
    return 0
  fi
  note "+ $(shjoin "$@")"
  "$@" 2>&1 | tee -a "$log_file"
}

# ---------------------------------------------------------------------------------------------- options
name='' zone='' accel='' version='' project='' capacity='' recreate=0 delete_after=0 commit=''
repo='' ref='' remote_dir=sc_dpo_jax jax_extra=tpu python=python3 venv='' copy=1 install=1 kill=0
envs=() main_args=() seen_separator=0

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
    --name) need_value "$arg" "$@"; name=$1; shift ;;
    --zone) need_value "$arg" "$@"; zone=$1; shift ;;
    --accelerator-type) need_value "$arg" "$@"; accel=$1; shift ;;
    --version | --runtime-version) need_value "$arg" "$@"; version=$1; shift ;;
    --project) need_value "$arg" "$@"; project=$1; shift ;;
    --repo) need_value "$arg" "$@"; repo=$1; shift ;;
    --ref) need_value "$arg" "$@"; ref=$1; shift ;;
    --remote-dir) need_value "$arg" "$@"; remote_dir=$1; shift ;;
    --jax-extra) need_value "$arg" "$@"; jax_extra=$1; shift ;;
    --python) need_value "$arg" "$@"; python=$1; shift ;;
    --venv) need_value "$arg" "$@"; venv=$1; shift ;;
    --env) need_value "$arg" "$@"; envs+=("$1"); shift ;;
    --log) need_value "$arg" "$@"; log_file=$1; shift ;;
    --spot | --preemptible | --recreate | --delete-after | --no-copy | --no-install | --kill | --dry-run)
      ((!inline)) || die "$arg takes no value"
      case $arg in
        --spot | --preemptible)
          [[ -z $capacity || $capacity == "$arg" ]] || die "--spot and --preemptible exclude each other"
          capacity=$arg ;;
        --recreate) recreate=1 ;;
        --delete-after) delete_after=1 ;;
        --no-copy) copy=0 ;;
        --no-install) install=0 ;;
        --kill) kill=1 ;;
        --dry-run) dry_run=1 ;;
      esac ;;
    --config* | --workdir* | -config* | -workdir*)
      die "$arg is an argument of sc_dpo_jax.main: put it after -- (e.g. $prog --name N ... -- --config=...)" ;;
    *) die "unknown option '$arg'" ;;
  esac
done

[[ -n $name ]] || die "--name NAME is required (the TPU VM to create or reuse)"
[[ -n $zone ]] || die "--zone ZONE is required (e.g. us-central2-b)"
if ((kill)); then
  ((${#main_args[@]} == 0)) || die "--kill stops the job on the workers and takes no arguments after --"
else
  ((seen_separator)) || die "missing -- followed by the arguments for sc_dpo_jax.main (--config=... --workdir=...)"
  check_main_args ${main_args[@]+"${main_args[@]}"}
  [[ -n $accel ]] || die "--accelerator-type TYPE is required (e.g. v4-32), to create the VM or check an existing one"
fi
if [[ -z $version && -n $accel ]]; then
  case $accel in
    v2-* | v3-* | v4-*) version='tpu-ubuntu2204-base' ;;
    v5litepod-* | v5e-*) version='v2-alpha-tpuv5-lite' ;;
    v5p-*) version='v2-alpha-tpuv5' ;;
    v6e-*) version='v2-alpha-tpuv6e' ;;
    *) die "no default --version for accelerator type '$accel': pass --version (see 'gcloud compute tpus tpu-vm versions list --zone $zone')" ;;
  esac
fi
safe_dir='^[A-Za-z0-9_][A-Za-z0-9._-]*$'
[[ $remote_dir =~ $safe_dir ]] || die "--remote-dir '$remote_dir' must be one plain directory name under the home directory (it is replaced on every copy)"
[[ -z $venv || $venv =~ $safe_dir ]] || die "--venv '$venv' must be one plain directory name under the home directory"
for kv in ${envs[@]+"${envs[@]}"}; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$kv' is not KEY=VALUE"
done
[[ $jax_extra =~ ^[A-Za-z0-9_,.-]+$ ]] || die "--jax-extra '$jax_extra' is not an extra name (e.g. tpu)"

if [[ -z $log_file ]]; then
  log_file=$root/workdir/launch_logs/tpu_pod-$name-$(date -u +%Y%m%d-%H%M%S).log
fi

if ((!dry_run)); then
  command -v gcloud >/dev/null || die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), or use --dry-run"
  if ((copy)) && [[ -z $repo ]]; then
    command -v git >/dev/null || die "git not found: it makes the tarball of this checkout (or use --repo URL / --no-copy)"
    commit=$(git -C "$root" rev-parse --verify --quiet "${ref:-HEAD}^{commit}") ||
      die "--ref '${ref:-HEAD}' is not a commit of the git checkout $root"
  fi
  mkdir -p "$(dirname "$log_file")"
  : >>"$log_file"
fi

# ------------------------------------------------------------------------------------------- commands
where=(--zone="$zone")
[[ -z $project ]] || where+=(--project="$project")
tpu=(gcloud compute tpus tpu-vm)
ssh_all=("${tpu[@]}" ssh "$name" "${where[@]}" --worker=all)

if [[ -n $venv ]]; then
  # shellcheck disable=SC2088  # the ~ is expanded by the shell on the worker
  remote_python="~/$venv/bin/python"
else
  remote_python=$(shquote "$python")
fi

if ((kill)); then
  # The [s] keeps pkill from matching the worker shell that runs this very command line.
  run_logged "${ssh_all[@]}" --command="pkill -f -- '-m [s]c_dpo_jax[.]main' || true"
  exit 0
fi

# ---- 1. the TPU VM: reuse it when READY, create it when it does not exist
create=("${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$accel" --version="$version")
[[ -z $capacity ]] || create+=("$capacity")
delete=("${tpu[@]}" delete "$name" "${where[@]}" --quiet)
describe=("${tpu[@]}" describe "$name" "${where[@]}" '--format=value(state,acceleratorType)')

tmp=''
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if ((delete_after)) && ((!dry_run)); then
    note "deleting TPU VM $name (--delete-after)"
    run_logged "${delete[@]}" || { local failed=$?; ((rc)) || rc=$failed; }
  fi
  [[ -z $tmp ]] || rm -rf "$tmp"
  exit "$rc"
}

if ((dry_run)); then
  run "${describe[@]}"
  printf '# only when describe reports NOT_FOUND (READY: reuse; other states: error, or delete and create with --recreate):\n'
  run "${create[@]}"
else
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/tpu_pod.XXXXXX")
  note "log file: $log_file"
  note "+ $(shjoin "${describe[@]}")"
  if info=$("${describe[@]}" 2>"$tmp/describe.err"); then
    read -r state existing_accel <<<"$info" || true
    note "TPU VM $name exists: state ${state:-unknown}, accelerator ${existing_accel:-unknown}"
    if [[ -n ${existing_accel:-} && $existing_accel != "$accel" ]]; then
      delete_after=0
      die "TPU VM $name is a $existing_accel, not the requested $accel: pick another --name, or delete it with: $(shjoin "${delete[@]}")"
    fi
    if [[ $state != READY ]]; then
      if ((recreate)); then
        run_logged "${delete[@]}"
        run_logged "${create[@]}"
      else
        delete_after=0
        die "TPU VM $name is $state, not READY: rerun with --recreate to delete and create it again, or delete it with: $(shjoin "${delete[@]}")"
      fi
    fi
  elif grep -q NOT_FOUND "$tmp/describe.err"; then
    note "TPU VM $name does not exist: creating it"
    run_logged "${create[@]}"
  else
    cat "$tmp/describe.err" >&2
    delete_after=0
    die "could not describe TPU VM $name (above: gcloud's message); check 'gcloud auth list', --project and --zone"
  fi
fi

# ---- 2. the code on every worker
if ((copy)); then
  new=$remote_dir.new
  if [[ -z $repo ]]; then
    tarball=${tmp:-${TMPDIR:-/tmp}/tpu_pod.XXXXXX}/$remote_dir.tar.gz
    if ((!dry_run)); then
      if [[ -z $ref || $ref == HEAD ]] && [[ -n $(git -C "$root" status --porcelain) ]]; then
        note "warning: this checkout has uncommitted changes or untracked files; only the committed HEAD is shipped"
      fi
      note "shipping commit $commit of $root"
    fi
    run git -C "$root" archive --format=tar.gz --output="$tarball" "${ref:-HEAD}"
    run_logged "${tpu[@]}" scp "$tarball" "$name:$remote_dir.tar.gz" "${where[@]}" --worker=all
    unpack="rm -rf $new && mkdir $new && tar -xzf $remote_dir.tar.gz -C $new && rm $remote_dir.tar.gz"
  else
    unpack="rm -rf $new && git clone --quiet $(shquote "$repo") $new"
    [[ -z $ref ]] || unpack+=" && git -C $new checkout --quiet $(shquote "$ref")"
  fi
  run_logged "${ssh_all[@]}" --command="$unpack && rm -rf $remote_dir && mv $new $remote_dir"
fi

# ---- 3. the install (editable, so later copies need no reinstall unless setup.py changes)
if ((install)); then
  setup=''
  [[ -z $venv ]] || setup="{ test -x $remote_python || $(shquote "$python") -m venv ~/$venv; } && "
  packages=(-e .)
  [[ $jax_extra == none ]] || packages+=("jax[$jax_extra]")
  pip="$remote_python -m pip install --quiet --progress-bar=off"
  run_logged "${ssh_all[@]}" \
    --command="${setup}cd $remote_dir && $pip --upgrade pip && $pip $(shjoin "${packages[@]}")"
fi

# ---- 4. the same main command on every worker, output streamed here and to the log
main=("-m" sc_dpo_jax.main "${main_args[@]}")
prefix=''
((${#envs[@]} == 0)) || prefix="env $(shjoin "${envs[@]}") "
run_logged "${ssh_all[@]}" --command="cd $remote_dir && exec $prefix$remote_python $(shjoin "${main[@]}")"

if ((dry_run)) && ((delete_after)); then
  run "${delete[@]}"
fi
