"""Multi-process start: ``jax.distributed.initialize`` when there is more than one process, nothing otherwise.

    parallel.initialize()          # first thing in main(), before anything touches a JAX device

Where the settings come from, first match wins:

1. the arguments (``coordinator_address`` "host:port", ``num_processes``, ``process_id``, ``local_device_ids``);
2. the environment variables ``SC_DPO_COORDINATOR``, ``SC_DPO_NUM_PROCESSES``, ``SC_DPO_PROCESS_ID`` (and
   ``SC_DPO_LOCAL_DEVICE_IDS``, comma-separated), which the ``launch/`` scripts set;
3. a cluster that JAX detects by itself: Slurm (``srun`` with more than one task), Open MPI (``mpirun``), a
   multi-host Cloud TPU slice (``TPU_WORKER_HOSTNAMES`` / ``MEGASCALE_COORDINATOR_ADDRESS``); then
   ``jax.distributed.initialize()`` is called without arguments and JAX reads the cluster's variables. A
   cluster JAX knows but this check does not (e.g. a GCE TPU VM that only its metadata server describes) is
   started with ``SC_DPO_DISTRIBUTED=auto``; ``SC_DPO_DISTRIBUTED=off`` skips everything (one process).

Otherwise the run is a single process and nothing is done. On CPU, cross-process collectives need an
implementation: ``jax_cpu_collectives_implementation`` is set to "gloo" when it is unset (GPU and TPU ignore
it). Calling :func:`initialize` again after a successful start does nothing.
"""
from __future__ import annotations

import logging
import os
from typing import Mapping, NamedTuple, Optional, Sequence, Union

import jax

ENV_COORDINATOR = "SC_DPO_COORDINATOR"
ENV_NUM_PROCESSES = "SC_DPO_NUM_PROCESSES"
ENV_PROCESS_ID = "SC_DPO_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "SC_DPO_LOCAL_DEVICE_IDS"
ENV_MODE = "SC_DPO_DISTRIBUTED"    # "auto": let JAX detect the cluster; "off": single process


class Plan(NamedTuple):
  """What :func:`initialize` decided: ``mode`` is "single", "explicit" or "auto" (JAX detects)."""
  mode: str
  reason: str
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  local_device_ids: Optional[Sequence[int]] = None


def _int_env(env: Mapping[str, str], key: str) -> Optional[int]:
  value = env.get(key)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {key}={value!r} must be an integer") from None


def detect_cluster(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
  """The multi-process cluster JAX can start from ``env`` (default ``os.environ``) without arguments, or None.

  Reads variables only (no network): a single-task Slurm or MPI job counts as no cluster.
  """
  env = os.environ if env is None else env
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
  if all(k in env for k in slurm) and (_int_env(env, "SLURM_NTASKS") or 1) > 1:
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in env and (_int_env(env, "OMPI_COMM_WORLD_SIZE") or 2) > 1:
    return "openmpi"
  hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or ""
  if len([h for h in hosts.split(",") if h.strip()]) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  return None


def plan(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
         process_id: Optional[int] = None, local_device_ids: Union[None, int, Sequence[int]] = None,
         env: Optional[Mapping[str, str]] = None) -> Plan:
  """What :func:`initialize` will do for these arguments and ``env`` (see the module docstring); no side
  effects. Raises ``ValueError`` naming what is missing when the settings are partial."""
  env = os.environ if env is None else env
  mode = (env.get(ENV_MODE) or "").strip().lower()
  if mode not in ("", "auto", "off"):
    raise ValueError(f"environment variable {ENV_MODE}={env.get(ENV_MODE)!r} must be 'auto', 'off' or unset")
  given = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
  source = "arguments"
  if all(v is None for v in given.values()) and local_device_ids is None:
    given = dict(coordinator_address=env.get(ENV_COORDINATOR) or None,
                 num_processes=_int_env(env, ENV_NUM_PROCESSES), process_id=_int_env(env, ENV_PROCESS_ID))
    ids = env.get(ENV_LOCAL_DEVICE_IDS)
    if ids:
      try:
        local_device_ids = [int(i) for i in ids.split(",") if i.strip()]
      except ValueError:
        raise ValueError(f"environment variable {ENV_LOCAL_DEVICE_IDS}={ids!r} must be comma-separated "
                         f"integers") from None
    source = f"environment ({ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})"
  if mode == "off":
    if any(v is not None for v in given.values()):
      raise ValueError(f"{ENV_MODE}=off but process settings were given ({source}): {given}")
    return Plan("single", f"{ENV_MODE}=off")
  if all(v is None for v in given.values()):
    if mode == "auto":
      return Plan("auto", f"{ENV_MODE}=auto", local_device_ids=local_device_ids)
    cluster = detect_cluster(env)
    if cluster is None:
      return Plan("single", "no coordinator given and no multi-process cluster detected")
    return Plan("auto", f"{cluster} cluster detected", local_device_ids=local_device_ids)
  missing = [k for k, v in given.items() if v is None]
  if missing:
    raise ValueError(f"multi-process settings from the {source} are incomplete: {missing} missing (given "
                     f"{ {k: v for k, v in given.items() if v is not None} }); pass all of coordinator_address, "
                     f"num_processes and process_id, or none to let JAX detect the cluster")
  n, i = int(given["num_processes"]), int(given["process_id"])
  if n < 1 or not 0 <= i < n:
    raise ValueError(f"process_id {i} must be in [0, num_processes = {n}) ({source})")
  if ":" not in str(given["coordinator_address"]):
    raise ValueError(f"coordinator_address {given['coordinator_address']!r} must be 'host:port' ({source})")
  return Plan("explicit", f"from the {source}", str(given["coordinator_address"]), n, i, local_device_ids)


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, local_device_ids: Union[None, int, Sequence[int]] = None) -> Plan:
  """Starts JAX's multi-process runtime when the run has several processes (see the module docstring).

  Must run before anything creates a JAX backend (``jax.devices()``, an array, a jit call). Returns the
  :class:`Plan` it followed and logs it, with the process index and count afterwards.
  """
  decided = plan(coordinator_address, num_processes, process_id, local_device_ids)
  if decided.mode == "single":
    logging.info("parallel.initialize: single process (%s)", decided.reason)
    return decided
  if jax.distributed.is_initialized():
    logging.info("parallel.initialize: jax.distributed is already initialized (process %d of %d)",
                 jax.process_index(), jax.process_count())
    return decided
  if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "", "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")   # CPU processes need it to talk
  logging.info("parallel.initialize: jax.distributed.initialize (%s; coordinator %s, %s processes, process %s)",
               decided.reason, decided.coordinator_address or "auto", decided.num_processes or "auto",
               decided.process_id if decided.process_id is not None else "auto")
  jax.distributed.initialize(coordinator_address=decided.coordinator_address, num_processes=decided.num_processes,
                             process_id=decided.process_id, local_device_ids=decided.local_device_ids)
  logging.info("parallel.initialize: process %d of %d, %d local devices of %d", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return decided
