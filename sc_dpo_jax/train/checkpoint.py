"""Orbax checkpoints of a run: the train state, the rng, every process's data position, and the config.

    ckpt = Checkpointer(workdir / "checkpoints", keep=3)          # local (made absolute) or gs://
    ckpt.save(step, state=state, rng=rng, data_state=it.state(), config=config.to_dict())
    ...
    restored = ckpt.restore_latest(abstract_state=abstract, abstract_rng=rng, config=config.to_dict())
    if restored:                                                     # None on a fresh start
      state, rng = restored.state, restored.rng
      it.restore(restored.data_state)

One ``orbax.checkpoint.CheckpointManager`` (asynchronous saves, atomic: a checkpoint exists only once it is
complete; the last ``keep`` are kept) with four items: ``state`` (the arrays, restored with the shardings of
``abstract_state``, so a resumed run gets its state already sharded), ``rng`` (the key's data as a host numpy
array, which Orbax writes from process 0 only: every process holds the same key, and a host-local jax.Array
cannot be saved by several processes), ``data`` (JSON: the data iterator positions of all processes,
gathered, each process restores its own) and ``config`` (JSON); and a fifth, optional one, ``extra`` (JSON:
host-side state a trainer needs to resume exactly, e.g. the RL trainer's per-prompt reward buffers; every
process must pass the same value). ``Restored.extra`` is None for a checkpoint saved without it.

Restoring is guarded: a checkpoint saved with another method, model or LoRA setting (``SAME_RUN_KEYS`` of its
config) is refused unless ``allow_changes``; a train state whose array names or shapes differ from the
checkpoint's is refused with the first differences named; a checkpoint that cannot be read (corrupted files)
is moved aside to ``<directory>.corrupt/<step>`` with a warning, and the previous one is restored.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from sc_dpo_jax import paths
from sc_dpo_jax.parallel import multihost

POSITION_KEYS = ("epoch", "ordinal", "batches", "records", "bad_records")
ITEMS = ("state", "rng", "data", "config", "extra")
# The config keys that make a checkpoint another run's: resuming across a change of these is refused.
SAME_RUN_KEYS = ("job", "objective.method", "model.path", "model.tiny", "model.architecture", "lora.enabled",
                 "lora.rank", "lora.alpha", "lora.targets", "rl.samples_per_prompt")


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

  def __init__(self, directory: paths.PathLike, *, keep: int = 3, async_save: bool = True):
    if keep < 1:
      raise ValueError(f"keep = {keep}: keep at least one checkpoint")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self.directory = paths.resolve(directory)      # Orbax needs absolute paths; gs:// stays as it is
    # Handlers named up front, so a fresh process can read a checkpoint's metadata before restoring it.
    handlers = dict(state=ocp.StandardCheckpointHandler(), rng=ocp.StandardCheckpointHandler(),
                    data=ocp.JsonCheckpointHandler(), config=ocp.JsonCheckpointHandler(),
                    extra=ocp.JsonCheckpointHandler())
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

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
        rng=ocp.args.StandardSave({"key": _host_key(rng)}),
        data=ocp.args.JsonSave({"iterator": data}),
        config=ocp.args.JsonSave(dict(config)),
    )
    if extra is not None:
      items["extra"] = ocp.args.JsonSave(dict(extra))
    return self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, *, abstract_state: Any, abstract_rng: Any) -> Restored:
    """Checkpoint ``step`` with the arrays laid out as ``abstract_state`` says (``jax.ShapeDtypeStruct`` s
    with shardings, e.g. from ``jax.eval_shape`` plus the run's shardings, or numpy arrays for state that
    process 0 saved from the host); ``abstract_rng`` is any key of the run's kind (its value is not used).
    A state whose names or shapes differ from the checkpoint's raises :class:`IncompatibleCheckpoint`."""
    self.check_structure(step, abstract_state)
    key = _host_key(abstract_rng)
    items = dict(
        state=ocp.args.StandardRestore(abstract_state),
        rng=ocp.args.StandardRestore({"key": np.zeros(key.shape, key.dtype)}),
        data=ocp.args.JsonRestore(),
        config=ocp.args.JsonRestore(),
    )
    has_extra = "extra" in self.manager.item_metadata(int(step)).keys()
    if has_extra:
      items["extra"] = ocp.args.JsonRestore()
    out = self.manager.restore(int(step), args=ocp.args.Composite(**items))
    rng = jnp.asarray(out["rng"]["key"])
    if jax.dtypes.issubdtype(getattr(abstract_rng, "dtype", None), jax.dtypes.prng_key):
      rng = jax.random.wrap_key_data(rng)
    return Restored(step=int(step), state=out["state"], rng=rng,
                    data_state=local_data_state(out["data"]["iterator"]), config=dict(out["config"]),
                    extra=dict(out["extra"]) if has_extra else None)

  def saved_config(self, step: int) -> Dict[str, Any]:
    """The config saved with checkpoint ``step`` (JSON)."""
    return dict(self.manager.restore(int(step), args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])

  def check_structure(self, step: int, abstract_state: Any) -> None:
    """Raises :class:`IncompatibleCheckpoint` naming the first arrays that the run's state and checkpoint
    ``step`` do not share, or whose shapes differ (e.g. LoRA switched on, another rank, another model)."""
    metadata = self.manager.item_metadata(int(step))["state"]
    if metadata is None:
      raise FileNotFoundError(f"{self.directory / str(step)} has no readable metadata for its train state")
    saved = _shapes(metadata)
    wanted = _shapes(abstract_state)
    order = lambda k: (not k.startswith("params"), k)      # the parameters first: they say the most
    missing = sorted(set(wanted) - set(saved), key=order)
    unexpected = sorted(set(saved) - set(wanted), key=order)
    reshaped = sorted((k for k in set(saved) & set(wanted) if saved[k] != wanted[k]), key=order)
    if not (missing or unexpected or reshaped):
      return
    where = self.directory / str(step)
    parts = []
    if missing:
      parts.append(f"{len(missing)} arrays of this run are not in it (first: {', '.join(missing[:3])})")
    if unexpected:
      parts.append(f"{len(unexpected)} of its arrays are not in this run (first: {', '.join(unexpected[:3])})")
    if reshaped:
      k = reshaped[0]
      parts.append(f"{len(reshaped)} arrays changed shape (first: {k} {saved[k]} in the checkpoint, {wanted[k]} "
                   f"now)")
    raise IncompatibleCheckpoint(
        f"checkpoint {where} does not hold this run's train state: {'; '.join(parts)}. It was saved by a run "
        f"with another model, method or LoRA setting (compare its config with this one); resume with the "
        f"config it was saved with, or start in a new workdir")

  def restore_latest(self, *, abstract_state: Any, abstract_rng: Any, config: Optional[Mapping[str, Any]] = None,
                     same_run_keys: Sequence[str] = SAME_RUN_KEYS,
                     allow_changes: bool = False) -> Optional[Restored]:
    """The newest intact checkpoint, or None on a fresh start.

    With ``config`` (the run's config as a dict) the checkpoint's config must agree on ``same_run_keys``
    (method, model, LoRA...), unless ``allow_changes``: :class:`IncompatibleCheckpoint` otherwise. A checkpoint
    that cannot be read (a corrupted or truncated file) is moved to ``<directory>.corrupt/<step>``, with a
    warning that says so, and the next older one is tried."""
    for step in sorted(self.all_steps(), reverse=True):
      if config is not None:
        check_same_run(self.saved_config_or_none(step), config, keys=same_run_keys, allow_changes=allow_changes,
                       where=self.directory / str(step))
      try:
        return self.restore(step, abstract_state=abstract_state, abstract_rng=abstract_rng)
      except IncompatibleCheckpoint:
        raise
      except Exception as e:  # pylint: disable=broad-except
        # Orbax, TensorStore and the JSON reader raise many kinds; any failure to read a checkpoint that has
        # the right structure means the files are damaged.
        self._set_aside(step, e)
    return None

  def saved_config_or_none(self, step: int) -> Optional[Dict[str, Any]]:
    try:
      return self.saved_config(step)
    except Exception:  # pylint: disable=broad-except
      return None      # unreadable: restore_latest sets the checkpoint aside and says why

  def _set_aside(self, step: int, error: BaseException) -> None:
    source = self.directory / str(step)
    target = epath.Path(f"{self.directory}.corrupt") / str(step)
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      if target.exists():
        target.rmtree()
      source.rename(target)
    multihost.barrier(f"set aside checkpoint {step}")
    self.manager.reload()
    logging.warning("checkpoint %s cannot be read (%s: %s); moved it to %s and trying the previous one",
                    source, type(error).__name__, first_line, target)

  def wait(self) -> None:
    """Blocks until the pending asynchronous save is on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def check_same_run(saved: Optional[Mapping[str, Any]], current: Mapping[str, Any], *, keys: Sequence[str],
                   allow_changes: bool, where: Any) -> None:
  """Refuses (:class:`IncompatibleCheckpoint`) to resume from a checkpoint whose config differs from
  ``current`` in one of ``keys`` (dotted), unless ``allow_changes``, which logs the differences instead."""
  if saved is None:
    return
  changed = []
  for key in keys:
    old, new = _lookup(saved, key), _lookup(current, key)
    if old is not _MISSING and new is not _MISSING and old != new:
      changed.append((key, old, new))
  if not changed:
    return
  listing = "; ".join(f"{k} = {o!r} in the checkpoint, {n!r} now" for k, o, n in changed)
  if allow_changes:
    logging.warning("resuming %s although the config changed (train.allow_config_change): %s", where, listing)
    return
  raise IncompatibleCheckpoint(
      f"the workdir's checkpoint {where} belongs to another run: {listing}. Use a new workdir, or set "
      f"--config.train.allow_config_change=True to continue it with the new values")


class IncompatibleCheckpoint(ValueError):
  """The checkpoint belongs to another run (other method, model or train-state structure)."""


_MISSING = object()


def _lookup(config: Mapping[str, Any], dotted: str) -> Any:
  node: Any = config
  for part in dotted.split("."):
    if not isinstance(node, Mapping) or part not in node:
      return _MISSING
    node = node[part]
  return node


def _shapes(tree: Any) -> Dict[str, tuple]:
  """``{"params.down_blocks_0....kernel": shape}`` of a state, an abstract state or Orbax's tree metadata."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {".".join(_key_name(k) for k in path): tuple(getattr(leaf, "shape", ())) for path, leaf in leaves}


def _key_name(key) -> str:
  for attr in ("name", "key", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _host_key(rng) -> np.ndarray:
  """The key's data as a host numpy array: Orbax writes numpy arrays from process 0 only, so a key every
  process holds alike (a host-local array) is saved once instead of refused in a multi-process run."""
  if jax.dtypes.issubdtype(getattr(rng, "dtype", None), jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  return np.asarray(rng)
