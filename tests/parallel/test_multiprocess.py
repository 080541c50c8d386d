"""Two JAX processes on localhost (gloo collectives) train exactly like one process with the whole batch.

Three subprocesses start together: two form one JAX job through ``parallel.initialize`` (2 CPU devices each, a
mesh of 4 devices with the parameters split four ways over ``fsdp``, i.e. across the processes) and each feeds
ITS half of every global batch through ``data.device.global_batch`` (``jax.make_array_from_process_local_data``);
the third is a plain single-device run of the unsharded step on the whole batch. After a few SC-DPO steps with
full fine-tuning both sides write their parameters and losses, and the test compares them. Settings are those
of ``test_sharding.py`` (AdamW with eps 1e-2, beta 20: see its docstring).
"""
import json
import os
import socket
import sys
import time

import numpy as np
import pytest
from jax.sharding import PartitionSpec

from tests import subprocess_helper
from tests.parallel.test_sharding import FAST_COMPILE, OPTIM, PAIRS, TOLERANCE

pytestmark = pytest.mark.xdist_group("parallel")

STEPS = 3
OBJECTIVE = dict(method="sc_dpo", beta=20.0)   # default prompt dropout 0.2: the step's rng matters too
MESH = {"data": 1, "fsdp": 4, "tensor": 1}


def _batches():
  """STEPS global batches of PAIRS pairs (numpy), the same in every process."""
  from tests.parallel.test_sharding import _world
  unet, schedule, params, batch, empty = _world()
  rng = np.random.RandomState(1)
  batches = []
  for _ in range(STEPS):
    order = rng.permutation(PAIRS)
    batches.append({k: v[order] for k, v in batch.items()})
  return unet, schedule, params, batches, empty


def _save(path, params, losses, extra=None):
  import jax
  from sc_dpo_jax.parallel import rules
  flat = {rules.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  np.savez(path, losses=np.asarray(losses, np.float64), **{f"param:{k}": v for k, v in flat.items()})
  if extra is not None:
    with open(str(path) + ".json", "w") as f:
      json.dump(extra, f)


def distributed_worker(process_id: int, port: int, out_dir: str):
  """One of the two processes: initialize, build the sharded state, train STEPS steps on its half."""
  import jax
  from jax.experimental import multihost_utils
  from sc_dpo_jax import parallel
  from sc_dpo_jax.data.device import global_batch
  from sc_dpo_jax.train import dpo_steps, optim, sharded_state
  plan = parallel.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id)
  assert plan.mode == "explicit" and jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
  unet, schedule, params, batches, empty = _batches()
  mesh = parallel.make_mesh(MESH)
  tx, lr_schedule = optim.make_optimizer(OPTIM)
  state, frozen, shardings = sharded_state.sharded_train_state(
      params, tx, lr_schedule, mesh=mesh, param_specs=parallel.module_logical_specs(unet), min_shard_size=0,
      empty_text=empty)
  step = parallel.make_sharded_step(dpo_steps.dpo_step_fn(unet, schedule, OBJECTIVE), shardings)
  half = PAIRS // 2
  losses = []
  start = time.time()
  for batch in batches:
    local = {k: v[process_id * half:(process_id + 1) * half] for k, v in batch.items()}
    state, metrics = step(state, frozen, global_batch(local, mesh), jax.random.PRNGKey(3))
    losses.append(float(metrics["loss"]))
  seconds = time.time() - start
  to_q = state.params["mid_block"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"]
  info = dict(spec=str(to_q.sharding.spec), local_rows=[int(s.data.shape[0]) for s in to_q.addressable_shards],
              global_shape=list(to_q.shape), seconds=round(seconds, 1), trace_count=step.trace_count,
              processes_in_mesh=sorted({d.process_index for d in mesh.devices.flat}))
  params_host = multihost_utils.process_allgather(state.params, tiled=True)
  if process_id == 0:
    _save(os.path.join(out_dir, "distributed.npz"), params_host, losses, info)
  multihost_utils.sync_global_devices("done")


def single_worker(out_dir: str):
  """The reference: one process, one device, the whole batch, the unsharded step."""
  import jax
  from sc_dpo_jax.train import dpo_steps, optim
  from sc_dpo_jax.train import state as state_lib
  unet, schedule, params, batches, empty = _batches()
  tx, lr_schedule = optim.make_optimizer(OPTIM)
  state, frozen = state_lib.create_train_state(params, tx, lr_schedule, empty_text=empty)
  step = dpo_steps.make_dpo_step(unet, schedule, OBJECTIVE)
  losses = []
  for batch in batches:
    state, metrics = step(state, frozen, batch, jax.random.PRNGKey(3))
    losses.append(float(metrics["loss"]))
  _save(os.path.join(out_dir, "single.npz"), jax.device_get(state.params), losses)
  _save(os.path.join(out_dir, "initial.npz"), params, [])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
  port = _free_port()
  base = dict(TF_CPP_MIN_LOG_LEVEL="3")     # and none of the launcher's variables (None removes them)
  base.update(dict.fromkeys(("SC_DPO_COORDINATOR", "SC_DPO_NUM_PROCESSES", "SC_DPO_PROCESS_ID", "SC_DPO_DISTRIBUTED")))
  module = "tests.parallel.test_multiprocess"
  commands = [(f"import {module} as t; t.distributed_worker({i}, {port}, {str(tmp_path)!r})",
               dict(base, XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {FAST_COMPILE}")) for i in range(2)]
  commands.append((f"import {module} as t; t.single_worker({str(tmp_path)!r})", dict(base, XLA_FLAGS=FAST_COMPILE)))
  began = time.time()
  jobs = [subprocess_helper.start([sys.executable, "-c", code], tmp_path / f"worker{i}.log", env=env)
          for i, (code, env) in enumerate(commands)]
  try:
    for job in jobs:
      job.wait(timeout=300)
  finally:
    for job in jobs:
      job.kill()
  wall = time.time() - began

  dist, single, initial = (np.load(tmp_path / name) for name in ("distributed.npz", "single.npz", "initial.npz"))
  with open(tmp_path / "distributed.npz.json") as f:
    info = json.load(f)
  keys = [k for k in single.files if k.startswith("param:")]
  assert sorted(keys) == sorted(k for k in dist.files if k.startswith("param:")) and len(keys) > 50
  param_diff = max(float(np.max(np.abs(dist[k] - single[k]))) for k in keys)
  moved = max(float(np.max(np.abs(single[k] - initial[k]))) for k in keys)
  loss_diff = float(np.max(np.abs(dist["losses"] - single["losses"])))
  print(f"2 processes vs 1 over {STEPS} steps: params max diff {param_diff:.1e} (moved {moved:.1e}), losses "
        f"{single['losses'].round(6).tolist()} max diff {loss_diff:.1e}; {info}; wall {wall:.0f}s")
  assert param_diff <= TOLERANCE and loss_diff <= TOLERANCE
  assert moved > 1e-3                                   # three updates of ~lr = 1e-3 each
  # the parameters really were split across the two processes (fsdp = 4 over 2 x 2 devices)
  assert info["processes_in_mesh"] == [0, 1] and info["spec"] == str(PartitionSpec("fsdp"))
  assert info["local_rows"] == [info["global_shape"][0] // 4] * 2
  assert info["trace_count"] == 1
