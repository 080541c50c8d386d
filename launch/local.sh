#!/usr/bin/env bash
# Runs one sc_dpo_jax job on this machine (CPU, or the local GPUs/TPU that JAX sees), optionally as several
# processes of one multi-process JAX job. Usage: --help, launch/README.md.
#   launch/local.sh -- --config=configs/unet_interop.py --workdir=workdir/interop --config.train.steps=200
#   launch/local.sh configs/unet_interop.py workdir/interop --config.train.steps=200      (same, older form)
set -euo pipefail

prog=launch/local.sh
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<EOF
Usage: $prog [options] -- --config=configs/<file>.py[:arg] --workdir=DIR [--config.key=value ...]
       $prog CONFIG WORKDIR [--config.key=value ...]        (older form: no options)

Runs \`python -m sc_dpo_jax.main ARGS\` here. Everything after \`--\` is passed to sc_dpo_jax.main unchanged
(--config and --workdir are required). By default it first runs \`make setup\` (creates .venv and installs
the package with its test extra when setup.py changed) and uses .venv/bin/python.

Options
  --processes N     start N processes of one multi-process JAX job on this machine; each gets
                    SC_DPO_COORDINATOR=localhost:PORT, SC_DPO_NUM_PROCESSES=N, SC_DPO_PROCESS_ID=i and its
                    output lines start with [i]; when one fails the others are stopped (default: 1, plain run)
  --port PORT       coordinator port for --processes (default: a random one in 20000-39999)
  --cpu-devices N   run JAX on the CPU with N simulated devices per process
                    (JAX_PLATFORMS=cpu, XLA_FLAGS+=--xla_force_host_platform_device_count=N)
  --python PY       Python to run instead of .venv/bin/python (then \`make setup\` is skipped)
  --dry-run         print the commands, one per line prefixed with '+ ', and run nothing
  -h, --help        this text

Options also take the form --option=VALUE.

Examples
  $prog -- --config=configs/unet_interop.py --workdir=workdir/x --config.attention=xla
  $prog --processes 2 --cpu-devices 4 -- --config=configs/unet_interop.py --workdir=workdir/mp
EOF
}

# The shared helpers: die, shquote, shjoin, check_main_args, need_value, positive.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$root/launch/common.sh"

# ---------------------------------------------------------------------------------------------- options
processes=1 port='' cpu_devices='' python='' dry_run=0 main_args=()

if (($# == 0)); then
  usage >&2
  exit 2
elif [[ $1 != -* ]]; then
  # Older form: CONFIG WORKDIR [overrides...].
  (($# >= 2)) || die "CONFIG given without WORKDIR (usage: $prog CONFIG WORKDIR [--config.key=value ...])"
  main_args=(--config="$1" --workdir="$2" "${@:3}")
else
  seen_separator=0
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
      --processes) need_value "$arg" "$@"; positive "$arg" "$1"; processes=$1; shift ;;
      --port) need_value "$arg" "$@"; positive "$arg" "$1"; port=$1; shift ;;
      --cpu-devices) need_value "$arg" "$@"; positive "$arg" "$1"; cpu_devices=$1; shift ;;
      --python) need_value "$arg" "$@"; python=$1; shift ;;
      --dry-run) ((!inline)) || die "$arg takes no value"; dry_run=1 ;;
      --config* | --workdir* | -config* | -workdir*)
        die "$arg is an argument of sc_dpo_jax.main: put it after -- (e.g. $prog -- --config=...)" ;;
      *) die "unknown option '$arg'" ;;
    esac
  done
  ((seen_separator)) || die "missing -- followed by the arguments for sc_dpo_jax.main (--config=... --workdir=...)"
fi
check_main_args ${main_args[@]+"${main_args[@]}"}
[[ -z $port || $processes -gt 1 ]] || die "--port is the coordinator port of --processes N (N > 1)"

# run CMD...: print CMD ('+ ' first; stdout for --dry-run, else nothing) and run it unless --dry-run.
run() {
  if ((dry_run)); then
    printf '+ %s\n' "$(shjoin "$@")"
    return 0
  fi
  "$@"
}

if [[ -z $python ]]; then
  python=$root/.venv/bin/python
  run make -s -C "$root" setup
fi

envs=()
if [[ -n $cpu_devices ]]; then
  envs+=(JAX_PLATFORMS=cpu "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$cpu_devices")
fi
main=("$python" -m sc_dpo_jax.main "${main_args[@]}")

if ((processes == 1)); then
  if ((dry_run)); then
    run ${envs[@]+env "${envs[@]}"} "${main[@]}"
    exit 0
  fi
  exec ${envs[@]+env "${envs[@]}"} "${main[@]}"
fi

# ---- several processes of one JAX job on this machine
port=${port:-$((20000 + RANDOM % 20000))}
pids=() reaped=' '
stop() {  # stop: end the processes this script started and has not yet seen exit
  local pid
  for pid in ${pids[@]+"${pids[@]}"}; do
    [[ $reaped == *" $pid "* ]] || kill "$pid" 2>/dev/null || true
  done
}
# A signal does not end this script at once: SIGTERM is passed on to the processes (a terminal's Ctrl-C reaches
# them directly, as it reaches this script), and the loop below waits for them to save their checkpoint and
# exit; the script then exits with their status (143 for SIGTERM, 130 for SIGINT).
signalled=''
# shellcheck disable=SC2329  # called from the TERM trap
forward() {  # forward SIG: send SIG to the processes still running
  local pid
  for pid in ${pids[@]+"${pids[@]}"}; do
    [[ $reaped == *" $pid "* ]] || kill -s "$1" "$pid" 2>/dev/null || true
  done
}
if ((!dry_run)); then
  trap 'signalled=INT' INT
  trap 'signalled=TERM; forward TERM' TERM
fi
for ((i = 0; i < processes; i++)); do
  command=(env ${envs[@]+"${envs[@]}"} SC_DPO_COORDINATOR="localhost:$port" SC_DPO_NUM_PROCESSES="$processes"
           SC_DPO_PROCESS_ID="$i" "${main[@]}")
  if ((dry_run)); then
    printf '+ %s 2>&1 | sed %s &\n' "$(shjoin "${command[@]}")" "$(shquote "s/^/[$i] /")"
    continue
  fi
  "${command[@]}" > >(while IFS= read -r line || [[ -n $line ]]; do printf '[%s] %s\n' "$i" "$line"; done) 2>&1 &
  pids+=("$!")
done
((!dry_run)) || exit 0

# Wait for all; the first failure stops the rest (they would wait for it in a collective forever), except
# after a signal, when every process is saving its part of the same checkpoint.
status=0
running=("${pids[@]}")
while ((${#running[@]})); do
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      still+=("$pid")
      continue
    fi
    rc=0
    wait "$pid" || rc=$?
    reaped+="$pid "
    if ((rc != 0 && status == 0)); then
      status=$rc
      if [[ -z $signalled ]]; then
        printf '%s: a process (pid %s) exited with status %s; stopping the others\n' "$prog" "$pid" "$rc" >&2
        stop
      fi
    fi
  done
  running=(${still[@]+"${still[@]}"})
  ((${#running[@]} == 0)) || sleep 0.2
done
exit "$status"
