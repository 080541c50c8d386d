"""Orbax checkpoints of a run: the train state, the rng, every process's data position, and the config.

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=3)
    ckpt.save(step, state=state, rng=rng, data_state=it.state(), config=config.to_dict())
    ...
    restored = ckpt.restore_latest(abstract_state=abstract, abstract_rng=rng)     # None on a fresh start
    if restored:
      state, rng = restored.state, restored.rng
      it.restore(restored.data_state)

One ``orbax.checkpoint.CheckpointManager`` (asynchronous saves, atomic: a checkpoint exists only once it is
complete; the last ``keep`` are kept) with four items: ``state`` (the arrays, restored with the shardings of
``abstract_state``, so a resumed run gets its state already sharded), ``rng``, ``data`` (JSON: the data
iterator positions of all processes, gathered, each process restores its own) and ``config`` (JSON, for the
record); and a fifth, optional one, ``extra`` (JSON: host-side state a trainer needs to resume exactly, e.g.
the RL trainer's per-prompt reward buffers; every process must pass the same value). ``Restored.extra`` is
None for a checkpoint saved without it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

POSITION_KEYS = ("epoch", "ordinal", "batches", "records", "bad_records")


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  rng: Any
  data_state: Optional[Dict[str, Any]]
  config: Dict[str, Any]
  extra: Optional[Dict[str, Any]] = None


def gather_data_states(state: Optional[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
  """Every process's data iterator position in one JSON-able dict (a collective: all processes call it)."""
  if state is None:
    return None
  local = np.array([int(state[k]) for k in POSITION_KEYS], np.int64)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    positions = np.asarray(multihost_utils.process_allgather(local)).reshape(jax.process_count(), -1)
  else:
    positions = local[None]
  check = {k: v for k, v in state["check"].items() if k != "process_index"}
  return {"version": state["version"], "check": check,
          "positions": [dict(zip(POSITION_KEYS, map(int, row))) for row in positions]}


def local_data_state(saved: Optional[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
  """This process's iterator state out of :func:`gather_data_states`' dict."""
  if saved is None:
    return None
  positions: List[Dict[str, int]] = saved["positions"]
  if len(positions) != jax.process_count():
    raise ValueError(f"the checkpoint holds data positions of {len(positions)} processes; this run has "
                     f"{jax.process_count()}: resume with the same number of processes")
  return {"version": saved["version"], **positions[jax.process_index()],
          "check": {**saved["check"], "process_index": jax.process_index()}}


class Checkpointer:
  """Saves and restores runs in ``directory`` (see the module docstring)."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    if keep < 1:
      raise ValueError(f"keep = {keep}: keep at least one checkpoint")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self.directory = directory
    self.manager = ocp.CheckpointManager(directory, options=options,
                                         item_names=("state", "rng", "data", "config", "extra"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> List[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, *, state: Any, rng: Any, data_state: Optional[Mapping[str, Any]],
           config: Mapping[str, Any], extra: Optional[Mapping[str, Any]] = None) -> bool:
    """Starts an asynchronous save (every process calls it); returns whether a save was started."""
    data = gather_data_states(data_state)
    items = dict(
        state=ocp.args.StandardSave(state),
        rng=ocp.args.StandardSave({"key": _key_data(rng)}),
        data=ocp.args.JsonSave({"iterator": data}),
        config=ocp.args.JsonSave(dict(config)),
    )
    if extra is not None:
      items["extra"] = ocp.args.JsonSave(dict(extra))
    return self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, *, abstract_state: Any, abstract_rng: Any) -> Restored:
    """Checkpoint ``step`` with the arrays laid out as ``abstract_state`` says (``jax.ShapeDtypeStruct`` s
    with shardings, e.g. from ``jax.eval_shape`` plus the run's shardings); ``abstract_rng`` is any key of
    the run's kind (its value is not used)."""
    key = _key_data(abstract_rng)
    items = dict(
        state=ocp.args.StandardRestore(abstract_state),
        rng=ocp.args.StandardRestore({"key": jax.ShapeDtypeStruct(key.shape, key.dtype)}),
        data=ocp.args.JsonRestore(),
        config=ocp.args.JsonRestore(),
    )
    has_extra = "extra" in self.manager.item_metadata(int(step)).keys()
    if has_extra:
      items["extra"] = ocp.args.JsonRestore()
    out = self.manager.restore(int(step), args=ocp.args.Composite(**items))
    rng = out["rng"]["key"]
    if jax.dtypes.issubdtype(getattr(abstract_rng, "dtype", None), jax.dtypes.prng_key):
      rng = jax.random.wrap_key_data(rng)
    return Restored(step=int(step), state=out["state"], rng=rng,
                    data_state=local_data_state(out["data"]["iterator"]), config=dict(out["config"]),
                    extra=dict(out["extra"]) if has_extra else None)

  def restore_latest(self, *, abstract_state: Any, abstract_rng: Any) -> Optional[Restored]:
    step = self.latest_step()
    if step is None:
      return None
    return self.restore(step, abstract_state=abstract_state, abstract_rng=abstract_rng)

  def wait(self) -> None:
    """Blocks until the pending asynchronous save is on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _key_data(rng):
  if jax.dtypes.issubdtype(getattr(rng, "dtype", None), jax.dtypes.prng_key):
    return jax.random.key_data(rng)
  return rng
