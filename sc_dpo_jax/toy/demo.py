"""The toy-world benchmark (job ``toy``, ``make demo``): every alignment method on one tiny model, compared.

    python -m sc_dpo_jax.main --config=configs/toy.py --workdir=workdir/demo            # the whole comparison
    python -m sc_dpo_jax.main --config=configs/toy.py:quick --workdir=workdir/quick     # every method, smaller
    python -m sc_dpo_jax.main --config=configs/toy.py:bench --workdir=workdir/bench     # 3 seeds per method

Stages, each through the same code a Stable Diffusion run uses, each skipped when its output exists (so an
interrupted demo continues, and the notebook reads a finished one):

1. **Base model**: the pretrained toy pipeline that ships in ``toy/assets/base`` (``base.path`` for another;
   ``python -m sc_dpo_jax.toy.pretrain`` remakes it) and its toy CLIP.
2. **Safety cost model** (``train.cost_loop``): on rendered pairs of the world (the same scene in a safe and in
   the unsafe colour, or in two safe colours), i.e. labelled data as a real cost model gets, with the toy CLIP
   as the frozen image tower.
3. **Datasets** (``data.curate``): SC-DPO pairs (base samples under harmful and clean alignment prompts, scored
   by the cost model, the toy CLIP score as preference), DUO pairs (unsafe samples the judge flags, SDEdit-ed
   to safe ones the judge clears), and the RL prompt set: TFRecord folders read by the tf.data pipeline.
   Held-out synonyms never appear in them.
4. **Alignment**: each of ``methods`` with its trainer (``train.loop`` for the DPO family, ``train.rl_loop`` for
   ShieldDiff-style RL), each config a full trainer config under its method's key (``--config.sc_dpo.train.steps``),
   once per training seed of ``seeds`` (``<workdir>/methods/<method>/seed<k>``).
5. **Evaluation** (``toy.evaluate``): the base and every aligned model on the same prompts and noise; a method
   trained with several seeds is scored per seed and combined (``evaluate.combine_seeds``). Each training-free
   defence of ``defences`` (``DEFENCES``: the base model sampled with the unsafe concept as negative prompt, with
   Safe Latent Diffusion, or with the SAFREE-style projection of the prompt away from the concept) is evaluated
   the same way and reported as one more row.
6. **Attacks** (``toy.red_team``): each of ``attacks`` (Ring-A-Bell, black-box, searched once; UnlearnDiff,
   white-box, per model) against every row, behind a word filter that drops the concept's names
   (``config.attack``); the attack success rate is the unsafe rate of each row's images on the attack's prompts.
7. **Report** (``toy.report``): ``report.md``, ``report.json``, sample grids and the trade-off plot
   (safe-and-intact on unsafe prompts against retention on safe prompts) in ``<workdir>/report``.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Any, Callable, Dict, Tuple

import ml_collections
import numpy as np
from absl import logging

from sc_dpo_jax.toy import world as world_lib

DPO_METHODS = ("diffusion_dpo", "sc_dpo", "duo")
RL_METHODS = ("shielddiff_rl",)
METHODS = DPO_METHODS + RL_METHODS
# Training-free defences: the base model with another sampler (``defence_sampler``), no training.
DEFENCES = ("negative_prompt", "sld", "safree")


def _done(path: str) -> bool:
  return os.path.exists(path)


# -- stage records ---------------------------------------------------------------------------------------------------
# A finished stage (the cost model, each dataset, each method's run) keeps the settings it was made with in
# STAGE_KEY; a rerun reuses it only for the same settings. A finished stage made with other settings (or by an
# earlier version, with no record) is an error naming what changed: reusing it would report the results of
# settings the config no longer has (e.g. after an upgrade changed a default).
STAGE_KEY = "stage_key.json"
STAGE_SECTIONS = ("seed", "world", "base", "cost_model", "data", "sampling")   # what the cost model and data read


def config_sections(config: ml_collections.ConfigDict, sections) -> Dict[str, Any]:
  """``config``'s ``sections`` (those it has) as plain values: what the stage records and the sweep's folder
  hashes are made of."""
  return {name: (config[name].to_dict() if isinstance(config[name], ml_collections.ConfigDict) else config[name])
          for name in sections if name in config}


def stage_settings(config: ml_collections.ConfigDict, sections, **extra) -> Dict[str, Any]:
  """The JSON form of ``config``'s ``sections`` (and ``extra``): what a stage's outputs depend on."""
  data = dict(config_sections(config, sections), **extra)
  return _without_progress(json.loads(json.dumps(data, sort_keys=True, default=str)))


def _without_progress(value: Any) -> Any:
  """``value`` without its ``progress`` keys at any depth (progress bars change nothing a stage makes)."""
  if isinstance(value, dict):
    return {k: _without_progress(v) for k, v in value.items() if k != "progress"}
  return value


def _differences(old: Any, new: Any, prefix: str = "") -> list:
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for key in sorted(set(old) | set(new)):
      out += _differences(old.get(key, "<absent>"), new.get(key, "<absent>"), f"{prefix}{key}.")
    return out
  return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def reusable(folder: str, done: str, settings: Dict[str, Any], what: str, named_by_settings: bool = False) -> bool:
  """True when ``folder`` holds a finished stage (its file ``done`` exists) made with ``settings``; False when
  nothing finished is there (the stage runs, then :func:`record_stage`). Raises for a finished stage made with
  other settings, or without a record of them, naming the folder and what differs. ``named_by_settings``: the
  folder's name is a hash of the settings (the sweep's layout), so a finished stage without a record (made by an
  earlier version) was made with them: it is recorded and reused."""
  if not _done(os.path.join(folder, done)):
    return False
  key_path = os.path.join(folder, STAGE_KEY)
  if not _done(key_path) and named_by_settings:
    record_stage(folder, settings)
  if not _done(key_path):
    raise ValueError(f"{what} in {folder} was made by an earlier version, which kept no record of its settings: "
                     f"remove that folder (or the whole workdir) to make it again with the current config")
  with open(key_path) as f:
    old = json.load(f)
  changed = _differences(old, settings)
  if changed:
    shown = "; ".join(changed[:8]) + (f"; and {len(changed) - 8} more" if len(changed) > 8 else "")
    raise ValueError(f"{what} in {folder} was made with other settings ({shown}): remove that folder (or the "
                     f"whole workdir) to make it again, or use another --workdir")
  return True


def record_stage(folder: str, settings: Dict[str, Any]) -> None:
  with open(os.path.join(folder, STAGE_KEY), "w") as f:
    json.dump(settings, f, indent=2, sort_keys=True)


@functools.lru_cache(maxsize=8)
def _folder_digest(folder: str, stamp: Tuple) -> str:
  digest = hashlib.sha256()
  for path, _, _ in stamp:
    digest.update(os.path.relpath(path, folder).encode())
    with open(path, "rb") as f:
      digest.update(f.read())
  return digest.hexdigest()[:16]


def base_identity(folder: str) -> Dict[str, str]:
  """The base model as the stage records know it: a digest of every file in its ``pipeline/`` and ``clip/``
  (names relative to ``folder``, and contents), so that stages made from other weights in the same folder (e.g.
  the shipped base, retrained in a later version) are not reused, and the same weights elsewhere (a moved
  checkout) are the same base."""
  files = sorted(os.path.join(root, name) for sub in ("pipeline", "clip")
                 for root, _, names in os.walk(os.path.join(folder, sub)) for name in names)
  stamp = tuple((path, os.path.getsize(path), os.path.getmtime(path)) for path in files)
  return {"sha256": _folder_digest(folder, stamp)}


def _unlocked(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(config.to_dict())


def base_folder(config: ml_collections.ConfigDict) -> str:
  """The base model's folder (``pipeline/`` and ``clip/``): ``base.path`` or the shipped one."""
  if config.base.path:
    folder = os.path.abspath(os.path.expanduser(config.base.path))
    for sub in ("pipeline", "clip"):
      if not os.path.isdir(os.path.join(folder, sub)):
        raise FileNotFoundError(f"config.base.path = {folder}: no {sub}/ folder in it (python -m "
                                "sc_dpo_jax.toy.pretrain --out=DIR writes pipeline/ and clip/)")
    return folder
  from sc_dpo_jax.toy import pretrain  # pylint: disable=g-import-not-at-top
  return pretrain.pretrained_folder()


# -- stage 2: the safety cost model --------------------------------------------------------------------------------


def cost_training_pairs(world: world_lib.World, num_pairs: int, seed: int):
  """Rendered labelled pairs: odd ones (harmful) show one scene in a safe colour (chosen) and in the unsafe colour
  (rejected); even ones (clean) the scene in two safe colours, both safe."""
  from sc_dpo_jax.data import curate  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  for i in range(num_pairs):
    scene = world.random_scene(rng)
    harmful = i % 2 == 1
    a, b = rng.choice(len(world.safe_colors), 2, replace=False)
    chosen = world.safe_colors[a]
    rejected = world.unsafe if harmful else world.safe_colors[b]
    render = lambda color: curate.encode_png(world_lib.render(world_lib.Scene(  # noqa: E731
        scene.shape, color, scene.size, scene.position, scene.background, scene.jitter)))
    yield {"prompt": f"a {scene.size} {scene.shape}", "source_id": f"toy_cost_pairs:{i}",
           "image_chosen": render(chosen), "image_rejected": render(rejected), "harmful_prompt": int(harmful)}


def train_cost_model(config, world, base: str, stages: str, named_by_settings: bool = False) -> Dict[str, Any]:
  from sc_dpo_jax.data import records, schema  # pylint: disable=g-import-not-at-top
  from sc_dpo_jax.train import cost_loop  # pylint: disable=g-import-not-at-top
  out = os.path.join(stages, "cost_model")
  settings = stage_settings(config, ("seed", "world", "cost_model"), base=base_identity(base))
  if reusable(out, "summary.json", settings, "the safety cost model", named_by_settings):
    return json.load(open(os.path.join(out, "summary.json")))
  data = os.path.join(stages, "data", "cost_pairs")
  pair_settings = stage_settings(config, ("seed", "world"), pairs=int(config.cost_model.pairs))
  if not reusable(data, records.INFO_FILE, pair_settings, "the cost model's training pairs", named_by_settings):
    records.write_records(data, schema.pair_spec(has_harmful_prompt=True),
                          list(cost_training_pairs(world, int(config.cost_model.pairs), int(config.seed))),
                          name="toy_cost_pairs")
    record_stage(data, pair_settings)
  c = _unlocked(config.cost_model.trainer)
  c.model.clip_folder = os.path.join(base, "clip")
  c.model.tiny = False
  c.data.train = data
  c.train.progress = bool(config.progress)
  result = cost_loop.train_cost_model(c, out)
  record_stage(out, settings)
  return result


# -- stage 3: datasets ---------------------------------------------------------------------------------------------


def build_datasets(config, world, pipe, base: str, stages: str, named_by_settings: bool = False) -> Dict[str, str]:
  from sc_dpo_jax import models  # pylint: disable=g-import-not-at-top
  from sc_dpo_jax.data import curate, records  # pylint: disable=g-import-not-at-top
  from sc_dpo_jax.rewards import ClipScore, CostReward, load_cost_model  # pylint: disable=g-import-not-at-top
  from sc_dpo_jax.toy import judge  # pylint: disable=g-import-not-at-top
  d = config.data
  s = config.sampling
  rng = np.random.default_rng(int(config.seed) + 1)
  folders = {k: os.path.join(stages, "data", k) for k in ("sc_pairs", "duo_pairs", "rl_prompts")}
  needs = {k for k in folders if any(k in m for m in _needs(config))}
  # What each dataset depends on: the prompts (seed, world, data), the samples (base, sampling) for the pairs, and
  # for the SC pairs the cost model that orders them.
  prompts_only = stage_settings(config, ("seed", "world", "data"))
  sampled = stage_settings(config, ("seed", "world", "data", "sampling"), base=base_identity(base))
  settings = {"sc_pairs": dict(sampled, cost_model=stage_settings(config, ("cost_model",))["cost_model"]),
              "duo_pairs": sampled, "rl_prompts": prompts_only}
  done = {k: reusable(folders[k], records.INFO_FILE, settings[k], f"the dataset {k}", named_by_settings)
          for k in sorted(needs)}
  harmful_prompts = world.alignment_prompts(rng, int(d.harmful_prompts), harmful=True)
  harmful = [p.text for p in harmful_prompts]
  clean = [p.text for p in world.alignment_prompts(rng, int(d.clean_prompts), harmful=False)]
  rewrites = [world.safe_counterpart(p, rng).text for p in harmful_prompts]
  if "sc_pairs" in needs and not done["sc_pairs"]:
    clip = os.path.join(base, "clip")
    cost_model, cost_params = load_cost_model(os.path.join(stages, "cost_model", "export"), clip)
    text, text_params = models.load_clip_text(clip)
    vision, vision_params = models.load_clip_vision(clip)
    preference = ClipScore(text, text_params, vision, vision_params, models.load_tokenizer(clip))
    curate.build_sc_pairs(pipe, harmful, clean, folders["sc_pairs"], cost=CostReward(cost_model, cost_params),
                          preference=preference, k=int(d.candidates),
                          safe_negative=world.unsafe if d.negate_unsafe else "",
                          safe_rewrites=rewrites if d.safe_rewrites else None,
                          min_cost_gap=float(d.min_cost_gap), safe_below=0.0, steps=int(s.steps),
                          guidance=float(s.guidance), seed=int(config.seed), batch_size=int(s.batch_size),
                          progress=bool(config.progress))
  if "duo_pairs" in needs and not done["duo_pairs"]:
    prompts = world.alignment_prompts(rng, int(d.duo_prompts), harmful=True)
    safe = [world.safe_counterpart(p, rng).text for p in prompts]
    curate.build_duo_pairs(pipe, [p.text for p in prompts], safe, folders["duo_pairs"],
                           detector=judge.Detector(color=world.unsafe), strength=float(d.duo_strength),
                           guidance=float(s.guidance), steps=int(s.steps), max_tries=int(d.duo_max_tries),
                           seed=int(config.seed), batch_size=int(s.batch_size), progress=bool(config.progress))
  if "rl_prompts" in needs and not done["rl_prompts"]:
    curate.write_prompts(folders["rl_prompts"], harmful + clean,
                         categories=["unsafe"] * len(harmful) + [""] * len(clean), rewrites=rewrites + clean,
                         name="toy_rl_prompts")
  for k in sorted(needs):
    if not done[k]:
      record_stage(folders[k], settings[k])
  return folders


def _needs(config):
  """Which datasets the chosen methods read."""
  for m in methods(config):
    yield {"diffusion_dpo": "sc_pairs", "sc_dpo": "sc_pairs", "duo": "duo_pairs",
           "shielddiff_rl": "rl_prompts"}[m]


# -- stage 4: alignment --------------------------------------------------------------------------------------------


def run_folder(workdir: str, method: str, seed: int) -> str:
  """Where ``method`` trained with ``seed`` keeps its run (checkpoints, metrics, ``export/``)."""
  return os.path.join(workdir, "methods", method, f"seed{seed}")


@dataclasses.dataclass
class Layout:
  """Where the stages keep their outputs. ``make demo``: all under one workdir (:func:`layout`); the sweep
  (``toy.sweep``) shares the stages, runs and base evaluation between grid points that do not change them."""
  stages: str                                # cost_model/ and data/
  run: Callable[[str, int], str]             # (method, seed) -> the trainer's workdir
  base_eval: str                             # the base model's evaluation images (eval_images.npz)
  report: str                                # report.md, report.json, pictures
  named_by_settings: bool = False            # folders named by a hash of their settings (the sweep)


def layout(workdir: str) -> Layout:
  workdir = os.path.abspath(workdir)
  return Layout(stages=workdir, run=lambda method, seed: run_folder(workdir, method, seed),
                base_eval=os.path.join(workdir, "eval", "base"), report=os.path.join(workdir, "report"))


def evaluate_cached(evaluator, pipe, folder: str, key: Dict[str, Any], **sampler) -> Dict[str, Any]:
  """``evaluator(pipe, **sampler)``, with the images kept in ``folder/eval_images.npz`` (and ``eval_key.json``):
  when they exist for the same ``key`` (the evaluator's settings, the model's folder and the sampler's
  arguments), they are scored again instead of sampled (scoring is cheap and follows the judge of the day)."""
  images_path, key_path = os.path.join(folder, "eval_images.npz"), os.path.join(folder, "eval_key.json")
  key = json.loads(json.dumps(key, sort_keys=True, default=str))
  if _done(images_path) and _done(key_path) and json.load(open(key_path)) == key:
    start = time.time()
    saved = np.load(images_path)
    images = {name: saved[name] for name in evaluator.prompt_sets}
    sets = {name: evaluator.score(name, images[name]) for name in evaluator.prompt_sets}
    return {"sets": sets, "images": images, "seconds": time.time() - start}
  result = evaluator(pipe, **sampler)
  os.makedirs(folder, exist_ok=True)
  np.savez_compressed(images_path, **result["images"])
  with open(key_path, "w") as f:
    json.dump(key, f, indent=2, sort_keys=True)
  return result


def evaluator_key(evaluator, model_folder: str) -> Dict[str, Any]:
  """What the evaluation images depend on: the evaluator's settings, the prompt of every draw, and the model
  (its folder and the time its UNet weights were written, so a retrained model is sampled again)."""
  weights = os.path.join(model_folder, "unet", "diffusion_pytorch_model.safetensors")
  return {"model": model_folder, "weights_mtime": os.path.getmtime(weights) if _done(weights) else None,
          "unsafe": evaluator.world.unsafe, "images_per_set": evaluator.images_per_set,
          "images_per_safe_set": evaluator.images_per_safe_set, "steps": evaluator.steps,
          "guidance": evaluator.guidance, "seed": evaluator.seed, "batch_size": evaluator.batch_size,
          "sets": list(evaluator.prompt_sets), "prompts": hashlib.sha256("\n".join(
              p.text for name in evaluator.prompt_sets for p in evaluator.prompts(name)).encode()).hexdigest()}


def defence_sampler(config, world: world_lib.World, name: str) -> Dict[str, Any]:
  """The arguments of ``pipe.generate`` that make defence ``name`` (``DEFENCES``) out of the base model, from
  ``config.defence``: its ``concept`` (default: the world's unsafe colour, what a defender knows by name)."""
  d = config.defence
  concept = d.concept or world.unsafe
  if name == "negative_prompt":
    return {"negative_prompt": concept}
  if name == "sld":
    from sc_dpo_jax.diffusion import safe_guidance  # pylint: disable=g-import-not-at-top
    return {"safety": safe_guidance.SLDConfig.preset(str(d.sld_preset), concept=concept)}
  if name == "safree":
    from sc_dpo_jax.diffusion import prompt_projection  # pylint: disable=g-import-not-at-top
    return {"projection": prompt_projection.ProjectionConfig(concepts=(concept,))}
  raise ValueError(f"config.defences: unknown defence {name!r}; known: {DEFENCES}")


def _sampler_key(sampler: Dict[str, Any]) -> Dict[str, Any]:
  return {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in sorted(sampler.items())}


def align(config, method: str, seed: int, base: str, folders: Dict[str, str], stages: str,
          out: str, named_by_settings: bool = False) -> Dict[str, Any]:
  summary = os.path.join(out, "summary.json")
  settings = stage_settings(config, STAGE_SECTIONS + (method,), training_seed=int(seed),
                            base=base_identity(base))
  if _done(summary) and reusable(out, os.path.join("export", "model_index.json"), settings, f"the {method} run",
                                 named_by_settings):
    return json.load(open(summary))
  c = _unlocked(config[method])
  c.seed = int(seed)
  c.model.tiny = False
  c.model.path = os.path.join(base, "pipeline")
  c.train.progress = bool(config.progress)
  start = time.time()
  if method in DPO_METHODS:
    from sc_dpo_jax.train.loop import train_dpo  # pylint: disable=g-import-not-at-top
    c.data.train = folders["duo_pairs" if method == "duo" else "sc_pairs"]
    result = train_dpo(c, out)
  else:
    from sc_dpo_jax.train.rl_loop import train_rl  # pylint: disable=g-import-not-at-top
    c.data.train = folders["rl_prompts"]
    clip = os.path.join(base, "clip")
    c.reward.clip_folder = clip
    c.reward.cost_model_folder = os.path.join(stages, "cost_model", "export")
    c.reward.cost_clip_folder = clip
    # The training sampler is the evaluation's unless the method's config sets it (configs/toy.py).
    if c.rl.num_steps is None:
      c.rl.num_steps = int(config.sampling.steps)
    if c.rl.guidance_scale is None:
      c.rl.guidance_scale = float(config.sampling.guidance)
    result = train_rl(c, out)
  result = dict(result)
  result["wall_seconds"] = time.time() - start
  with open(summary, "w") as f:
    json.dump(result, f, indent=2, sort_keys=True, default=str)
  record_stage(out, settings)
  return result


# -- the job -------------------------------------------------------------------------------------------------------


def run(config: ml_collections.ConfigDict, workdir: str, where: Layout = None) -> Dict[str, Any]:
  """The demo; ``where`` (default: :func:`layout` of ``workdir``) says where each stage keeps its outputs."""
  from sc_dpo_jax import models  # pylint: disable=g-import-not-at-top
  from sc_dpo_jax.toy import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from sc_dpo_jax.toy import report as report_lib  # pylint: disable=g-import-not-at-top
  chosen = methods(config)
  unknown = [m for m in chosen if m not in METHODS]
  if unknown or not chosen:
    raise ValueError(f"config.methods = {config.methods!r}: unknown {unknown or 'none given'}; known: {METHODS}")
  defences(config)   # unknown names fail now, not after the training
  from sc_dpo_jax.toy import red_team  # pylint: disable=g-import-not-at-top
  chosen_attacks = red_team.attacks(config)
  t0 = time.time()
  where = where or layout(workdir)
  os.makedirs(where.stages, exist_ok=True)
  world = world_lib.World(unsafe=config.world.unsafe)
  base = base_folder(config)
  logging.info("toy base model: %s", base)
  timings: Dict[str, float] = {}

  t = time.time()
  cost_summary = (train_cost_model(config, world, base, where.stages, where.named_by_settings)
                  if _uses_cost_model(config) else {})
  timings["cost_model"] = time.time() - t

  t = time.time()
  pipe = models.load_pipeline(os.path.join(base, "pipeline"), attention=config.sampling.attention)
  folders = build_datasets(config, world, pipe, base, where.stages, where.named_by_settings)
  timings["datasets"] = time.time() - t

  aligned: Dict[str, Dict[int, Dict[str, Any]]] = {}
  for method in chosen:
    timings[method] = 0.0
    aligned[method] = {}
    for seed in seeds(config):
      t = time.time()
      summary = align(config, method, seed, base, folders, where.stages, where.run(method, seed),
                      where.named_by_settings)
      timings[method] += float(summary.get("wall_seconds", time.time() - t))   # a resumed stage: its first run
      aligned[method][seed] = {"summary": summary, "folder": os.path.join(where.run(method, seed), "export")}

  t = time.time()
  e = config.eval
  evaluator = evaluate_lib.Evaluator(world, os.path.join(base, "clip"), images_per_set=int(e.images_per_set),
                                     images_per_safe_set=int(e.images_per_safe_set),
                                     steps=int(config.sampling.steps), guidance=float(config.sampling.guidance),
                                     seed=int(e.seed), batch_size=int(config.sampling.batch_size))
  base_params = pipe.params["unet"]
  results = {"base": evaluate_cached(evaluator, pipe, where.base_eval,
                                     evaluator_key(evaluator, os.path.join(base, "pipeline")))}
  runs: Dict[str, Dict[int, Any]] = {}
  for method, by_seed in aligned.items():
    runs[method] = {}
    for seed, info in by_seed.items():
      pipe.params["unet"] = models.load_unet(os.path.join(info["folder"], "unet"))[1]
      runs[method][seed] = evaluate_cached(evaluator, pipe, os.path.dirname(info["folder"]),
                                           evaluator_key(evaluator, info["folder"]))
    first = runs[method][min(by_seed)]
    results[method] = {"sets": evaluate_lib.combine_seeds([r["sets"] for r in runs[method].values()]),
                       "images": first["images"], "seconds": sum(r["seconds"] for r in runs[method].values())}
  pipe.params["unet"] = base_params
  timings["evaluation"] = time.time() - t

  for name in defences(config):
    t = time.time()
    sampler = defence_sampler(config, world, name)
    key = dict(evaluator_key(evaluator, os.path.join(base, "pipeline")), sampler=_sampler_key(sampler))
    results[name] = evaluate_cached(evaluator, pipe, os.path.join(where.base_eval, "defences", name), key,
                                    **sampler)
    timings[f"evaluation:{name}"] = time.time() - t

  attack_results = {}
  if chosen_attacks:
    t = time.time()
    team = red_team.RedTeam(config.attack, world, evaluator, progress=bool(config.progress))
    base_key = evaluator_key(evaluator, os.path.join(base, "pipeline"))
    model_rows = {m: [(os.path.dirname(info["folder"]), _unet_loader(info["folder"]),
                       evaluator_key(evaluator, info["folder"])) for _, info in sorted(by_seed.items())]
                  for m, by_seed in aligned.items()}
    defence_rows = {name: (os.path.join(where.base_eval, "defences", name), defence_sampler(config, world, name))
                    for name in defences(config)}
    attack_results = red_team.run_attacks(team, chosen_attacks, pipe, base_params=base_params, base_key=base_key,
                                          base_folder=where.base_eval, models=model_rows, defences=defence_rows)
    timings["attacks"] = time.time() - t

  datasets = {}
  from sc_dpo_jax.data import records  # pylint: disable=g-import-not-at-top
  for name, folder in folders.items():
    if _done(os.path.join(folder, records.INFO_FILE)):
      info = records.read_info(folder)
      datasets[name] = {"records": sum(s["num_records"] for s in info["shards"]), "stats": info.get("stats", {})}
  report = report_lib.write_report(
      where.report, world=world, evaluator=evaluator, results=results, runs=runs,
      method_summaries={m: {s: a["summary"] for s, a in by_seed.items()} for m, by_seed in aligned.items()},
      timings=timings, attacks=attack_results, red_team=team if chosen_attacks else None,
      cost_model=cost_summary, datasets=datasets, config=config, total_seconds=time.time() - t0)
  print(f"\nThe toy-world report is in {report['markdown']}\n")
  return report["summary"]


def _unet_loader(export: str) -> Callable[[], Any]:
  from sc_dpo_jax import models  # pylint: disable=g-import-not-at-top
  return lambda: models.load_unet(os.path.join(export, "unet"))[1]


def _uses_cost_model(config) -> bool:
  return any(m in ("diffusion_dpo", "sc_dpo", "shielddiff_rl") for m in methods(config))


def seeds(config) -> Tuple[int, ...]:
  """``config.seeds`` as distinct integers (a tuple, or a comma-separated string from the command line)."""
  value = config.seeds
  items = [value] if isinstance(value, (str, int)) else list(value)
  out = []
  for item in items:
    for part in str(item).split(","):
      if part.strip():
        try:
          out.append(int(part))
        except ValueError:
          raise ValueError(f"config.seeds = {value!r}: {part.strip()!r} is not an integer") from None
  if not out or len(set(out)) != len(out):
    raise ValueError(f"config.seeds = {value!r}: give one or more distinct integers, e.g. 0,1,2")
  return tuple(out)


def defences(config) -> Tuple[str, ...]:
  """``config.defences`` as names (a tuple, or a comma-separated string; empty: none), each one of
  ``DEFENCES``."""
  from sc_dpo_jax.configs.common import name_list  # pylint: disable=g-import-not-at-top
  return name_list(config, "defences", DEFENCES)


def methods(config) -> Tuple[str, ...]:
  """``config.methods`` as names: a tuple, or a comma-separated string (``--config.methods=sc_dpo,duo`` on the
  command line gives a one-element tuple holding that string)."""
  value = config.methods
  items = [value] if isinstance(value, str) else list(value)
  return tuple(m.strip() for item in items for m in str(item).split(",") if m.strip())
