# shellcheck shell=bash
# The helpers launch/local.sh, launch/tpu_pod.sh and launch/gpu_slurm.sh share: sourced, not run. The script
# sets `prog` (its name in messages) first. How each script finds this file: launch/README.md ("Shared helpers").

prog=${prog:?set prog before sourcing launch/common.sh}

# die MESSAGE...: a usage error: the message and a pointer to --help on stderr, exit status 2.
die() {
  printf '%s: error: %s\n' "$prog" "$*" >&2
  printf "Run '%s --help' for usage.\n" "$prog" >&2
  exit 2
}

# shquote ARG: ARG quoted for a POSIX shell (left bare when that is plainly safe).
shquote() {
  local s=$1 q="'\\''"
  if [[ $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$s"; else printf "'%s'" "${s//\'/$q}"; fi
}

# shjoin ARG...: one command line that a shell splits back into exactly ARG...
shjoin() {
  local a out=()
  for a in "$@"; do out+=("$(shquote "$a")"); done
  local IFS=' '
  printf '%s' "${out[*]}"
}

# check_main_args ARG...: the arguments after -- name a config and a workdir.
check_main_args() {
  local a prev='' config=0 workdir=0
  for a in "$@"; do
    case $a in
      --config=?* | -config=?*) config=1 ;;
      --workdir=?* | -workdir=?*) workdir=1 ;;
    esac
    case $prev in
      --config | -config) config=1 ;;
      --workdir | -workdir) workdir=1 ;;
    esac
    prev=$a
  done
  ((config)) || die "no --config=configs/<file>.py after -- (the arguments for sc_dpo_jax.main go after --)"
  ((workdir)) || die "no --workdir=DIR after -- (the arguments for sc_dpo_jax.main go after --)"
}

need_value() {  # need_value OPTION [NEXT...]: OPTION is followed by a value
  (($# >= 2)) && [[ $2 != -- ]] || die "$1 needs a value"
}

positive() {  # positive OPTION VALUE
  [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive whole number, not '$2'"
}
