"""The safety cost model's trainer (job ``cost_model``): ``C(x) = g(normalize(CLIP_image(x)))`` on a pair dataset.

    python -m sc_dpo_jax.main --config=configs/cost_model.py:tiny --workdir=workdir/cost_model
    python -m sc_dpo_jax.main --config=configs/cost_model.py:sd15 --workdir=workdir/cost_model_sd15 \\
        --config.model.clip_folder=/models/clip-vit-large-patch14 --config.data.train=data/scp_pairs

THIS PROJECT'S FORMULATION (METHODS.md, "SC-DPO", safety cost model): CLIP is frozen and ``g`` a small MLP
(``rewards.cost_model``), trained on ``L_cost = L_rank + alpha * L_anchor`` (``losses.cost_model``). The config
(every key) is ``configs.cost_model``'s.

What :func:`train_cost_model` does, in order:

1. **CLIP** (``train.cost_data.load_clip``): the vision tower with projection in ``model.clip_folder``; for
   ``model.tiny`` without a folder a random tiny tower (``models.tiny_vision_config``) is made once and written
   to ``<workdir>/clip``, so the export can be loaded like any other (``load_cost_model(export, <workdir>/clip)``).
2. **Data** (``train.cost_data``): the pair dataset ``data.train`` (or, tiny, ``data.synthetic.write_synthetic_pairs``
   into ``<workdir>/data``), **embedded once** by the frozen CLIP and cached in ``<workdir>/embeddings/<split>.npz``
   (reused on resume while the data, CLIP and resolution are the same).
3. **Held-out set**: ``data.eval`` (a second pair dataset, embedded alike) or, without one, ``data.eval_fraction``
   of the pairs (``data.cost_pairs.split_held_out``: whole pairs, chosen by a seeded permutation).
4. **Labels** (``data.cost_pairs.label_splits``, whose module docstring gives the rules): ranking pairs by
   ``labels.rank_by``, anchor labels (+1 harmful, -1 safe, or none) by ``labels.anchor_by``, each ``"cost"``,
   ``"preference"`` or ``"auto"``; the resolved rules are in ``summary.json``.
5. **Steps**: ``data.cost_pairs.Batches`` (a batch is a pure function of ``(seed, step)``, so the data position
   of a checkpoint is its step) into ``train.cost_steps.cost_train_step`` (``optim.*``, ``loss.alpha``) inside
   the NaN guard (``train.guard``).
6. **Loop**: progress bar; every ``train.log_every`` steps the mean train-batch metrics (loss, rank_loss,
   anchor_loss, ranking_accuracy, anchor_accuracy, mean costs, grad_norm) to ``metrics.jsonl`` and TensorBoard;
   every ``train.eval_every`` steps (and at the end) the held-out metrics ``eval/*`` (``train.cost_steps.evaluate``);
   an Orbax checkpoint (state, rng, config) every ``train.checkpoint_every`` steps; SIGTERM/SIGINT finish the
   step, save and return; a restart resumes from the latest checkpoint (a changed data or labelling key,
   ``ORDER_KEYS``, is refused, naming it).
7. **Export** (``train.export``): ``rewards.cost_model.save_cost_model`` to ``<workdir>/export``, which
   ``load_cost_model(export, clip_folder)`` and ``CostReward`` read.

Returns a summary dict (also ``<workdir>/summary.json``) with the final held-out accuracies.

**Several processes** (a pod launch runs the same command on every host): every process trains the same adapter on
the same data, its state host-local on the process's first device (the adapter is a few hundred thousand parameters
on precomputed embeddings: there is nothing to shard). Everything written is written once, by process 0, while the
others wait at a barrier (``parallel.multihost.barrier``): the tiny CLIP folder and the synthetic pairs (then read
by all), the embeddings cache (process 0 computes or reuses it; the others read the very same file, so every process
trains on identical embeddings), the checkpoints (the state is saved as host numpy arrays, which Orbax writes from
its primary host; a resumed run puts the restored arrays back on its device), the metrics, ``summary.json`` and the
export. So the workdir must be one that every process sees: a bucket (``gs://``) or a shared filesystem, as the
checkpoints of any multi-process run need. At each checkpoint the processes compare a digest of their state and log
a warning if one differs from process 0's (the checkpoint and export hold process 0's). Workdir files go through
``etils.epath`` (``sc_dpo_jax.paths``), so ``--workdir=gs://bucket/run`` works, given ``data.train``: a tiny run's
synthetic pairs are written with local files only.
"""
from __future__ import annotations

import hashlib
import time
from typing import Any, Dict, Mapping

import jax
import ml_collections
import numpy as np
from absl import logging

from sc_dpo_jax import paths
from sc_dpo_jax.data import cost_pairs
from sc_dpo_jax.parallel.multihost import barrier
from sc_dpo_jax.rewards import cost_model as cost_lib
from sc_dpo_jax.train import cost_data, cost_steps, guard, harness, optim

# Keys that define which pairs, labels and batches a run sees: a resumed run must have the saved values.
ORDER_KEYS = ("seed", "model.clip_folder", "data.train", "data.split", "data.eval", "data.eval_split",
              "data.eval_fraction", "data.synthetic_pairs", "data.resolution", "data.batch_size",
              "data.labelled_batch_size", "data.balance_labels", "labels.rank_by", "labels.anchor_by",
              "labels.min_cost_gap", "labels.harmful_above", "labels.safe_below")


def _flat(config_json: Mapping[str, Any], key: str):
  node = config_json
  for part in key.split("."):
    if not isinstance(node, Mapping) or part not in node:
      return KeyError
    node = node[part]
  return node


def check_resume_config(saved: Mapping[str, Any], current: Mapping[str, Any], directory: str) -> None:
  """Refuses to resume when a key that defines the pairs, labels or batches (``ORDER_KEYS``) changed."""
  for key in ORDER_KEYS:
    old, new = _flat(saved, key), _flat(current, key)
    if old is not KeyError and old != new:
      raise ValueError(f"the checkpoint in {directory} was saved with config {key} = {old!r}; this run has "
                       f"{new!r}: the resumed run would see other pairs, labels or batches. Use the saved value "
                       f"or a new workdir")


# -- the run ------------------------------------------------------------------------------------------------------


def train_cost_model(config: ml_collections.ConfigDict, workdir: paths.PathLike) -> Dict[str, Any]:
  """Trains the safety cost model's adapter as the module docstring says; every process of a multi-process job
  calls it. Returns the summary (process 0's, the one in ``<workdir>/summary.json``)."""
  t_start = time.time()
  c = config
  root = paths.resolve(workdir)         # local made absolute once; gs:// as it is
  primary = jax.process_index() == 0
  device = jax.local_devices()[0]       # the adapter's state lives here, on every process alike
  progress = bool(c.train.progress) and primary
  clip, clip_params, clip_folder = cost_data.load_clip(c, root)
  adapter = cost_lib.CostAdapter(hidden_sizes=tuple(c.model.hidden_sizes), activation=c.model.activation)
  model = cost_lib.SafetyCostModel(clip, adapter, clip_name=c.model.clip_name or clip_folder)
  resolution = int(c.data.resolution) or model.image_size
  train_source, eval_source = cost_data.open_sources(c, root, resolution)

  # Embeddings, once (CLIP is frozen), then labels and batches.
  def embeddings(source, name):
    return cost_data.source_embeddings(c, root, name, model, clip_params, clip_folder, source,
                                       resolution=resolution, progress=progress)

  all_train, train_info = embeddings(train_source, "train")
  if eval_source is not None:
    train_pairs, (eval_pairs, eval_info) = all_train, embeddings(eval_source, "eval")
  else:
    train_pairs, eval_pairs = cost_pairs.split_held_out(all_train, float(c.data.eval_fraction), int(c.seed))
    eval_info = None
  train_data, eval_data, rank_by, anchor_by = cost_pairs.label_splits(
      train_pairs, eval_pairs, c.labels, has_costs=train_source.spec.has_costs,
      where=c.data.train or "the synthetic pairs", held_out_where=c.data.eval,
      held_out_costs=eval_source.spec.has_costs if eval_source is not None else None)
  counts = train_data.counts()
  batches = cost_pairs.Batches(train_data, pairs_per_step=int(c.data.batch_size),
                               labelled_per_step=int(c.data.labelled_batch_size),
                               balance=bool(c.data.balance_labels), seed=int(c.seed))

  # State and step.
  tx, lr_schedule = optim.make_optimizer(c.optim)
  logging.info("optimizer: %s", optim.describe(c.optim))
  rng = jax.random.PRNGKey(int(c.seed))
  state = jax.device_put(cost_steps.create_cost_train_state(model, jax.random.fold_in(rng, 1), tx=tx,
                                                            anchor_weight=float(c.loss.alpha)), device)
  step_fn = jax.jit(guard.skip_nonfinite(cost_steps.cost_train_step), donate_argnums=(0,))
  cost_fn = jax.jit(model.cost_from_embeddings)
  alpha = float(c.loss.alpha)

  # Resume.
  config_json = harness.config_dict(c)
  # The state is checkpointed as host numpy arrays (save, below), which Orbax writes from process 0 alone; a
  # host-local jax.Array held by several processes could not be saved. Restored as numpy, put back on `device`.
  run = harness.Run(c, root, name="cost_model", unit="step", total=int(c.train.steps))
  ckpt = run.ckpt
  latest = ckpt.latest_step()
  saved = ckpt.saved_config_or_none(latest) if latest is not None else None    # unreadable: set aside below
  if saved is not None:
    check_resume_config(saved, config_json, ckpt.directory)
  restored = run.resume(abstract_state=jax.device_get(state), rng=rng)
  if restored is not None:
    state, rng = jax.device_put((restored.state, restored.rng), device)
  start_step = int(state.step)

  def save(step: int) -> None:
    host_state = jax.device_get(state)
    check_same_state(host_state, step)
    ckpt.save(step, state=host_state, rng=rng, data_state=None, config=config_json)

  summary: Dict[str, Any] = {
      "workdir": str(root), "clip_folder": clip_folder, "start_step": start_step,
      "labels": {"rank_by": rank_by, "anchor_by": anchor_by, "min_cost_gap": float(c.labels.min_cost_gap),
                 "harmful_above": float(c.labels.harmful_above), "safe_below": float(c.labels.safe_below)},
      "train_data": {**counts, "embeddings": train_info},
      "eval_data": ({**eval_data.counts(), "source": "data.eval" if eval_source is not None else
                     f"data.eval_fraction = {c.data.eval_fraction}", "embeddings": eval_info or "split of train"}
                    if eval_data is not None else None),
  }
  run.open(start_step)
  if eval_data is not None:
    summary["eval_at_start"] = cost_steps.evaluate(cost_fn, state.params, eval_data, alpha)
    if start_step == 0:
      run.log(0, summary["eval_at_start"])
  last_eval = summary.get("eval_at_start")
  last_train: Dict[str, float] = {}
  with run:
    for index in run.indices(start_step):
      state, metrics = step_fn(state, None, batches(index), rng)
      run.window.add(index, metrics)
      due = run.tick(index + 1)
      record: Dict[str, Any] = {}
      if due.log:     # a stop keeps its window
        last_train, window_steps, elapsed = run.window.means()
        record.update(last_train)
        record.update({"learning_rate": float(lr_schedule(due.index - 1)), "steps_per_s": window_steps / elapsed,
                       "pairs_per_s": window_steps * int(c.data.batch_size) / elapsed,
                       "skipped_updates_total": run.counter.total})
      if eval_data is not None and (due.index % int(c.train.eval_every) == 0 or due.last):
        last_eval = cost_steps.evaluate(cost_fn, state.params, eval_data, alpha)
        record.update(last_eval)
      if record:
        postfix = ({"loss": f"{last_train['loss']:.4f}", "rank_acc": f"{last_train['ranking_accuracy']:.2f}"}
                   if due.log else {})
        run.log(due.index, record, **postfix)
      if due.checkpoint:
        save(due.index)
      if due.stop:
        run.stopped(due.index)
        break
  summary.update({"final_step": int(state.step), **run.end(), "train_final": last_train})
  if eval_data is not None:
    summary["eval_final"] = last_eval
  if not run.stopped_by_signal and c.train.export:
    folder = root / "export"
    if primary:
      cost_lib.save_cost_model(str(folder), model, jax.device_get(state.params))
    summary["export"] = str(folder)
  run.close(summary, t_start)
  barrier("cost model: summary and export")
  return summary


def state_digest(host_state: Any) -> np.ndarray:
  """SHA-256 of every array of ``host_state`` (names, dtypes, shapes and bytes) as 32 uint8s."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(host_state)[0]:
    leaf = np.ascontiguousarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}:{leaf.dtype}:{leaf.shape};".encode())
    digest.update(leaf.tobytes())
  return np.frombuffer(digest.digest(), np.uint8)


def check_same_state(host_state: Any, step: int) -> bool:
  """Several processes: whether every process holds the same train state as process 0 (a collective: all
  call it); a difference is logged as a warning naming the processes (the checkpoint and export hold process
  0's). True with one process."""
  if jax.process_count() == 1:
    return True
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  digests = np.asarray(multihost_utils.process_allgather(state_digest(host_state))).reshape(jax.process_count(), -1)
  differing = [i for i in range(len(digests)) if not np.array_equal(digests[i], digests[0])]
  if differing:
    logging.warning("step %d: the cost-model train state of process(es) %s differs from process 0's, although "
                    "every process trains on the same embeddings and batches (a nondeterministic device "
                    "computation?); the checkpoint and the export hold process 0's", step, differing)
  return not differing
