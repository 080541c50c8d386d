"""One table for Stable Diffusion models and training-free defences, on prompt sets and under attack.

    python -m sc_dpo_jax.eval.compare --model=base=models/sd15 --model=sc_dpo=out/sc_dpo/export \\
        --defences=negative_prompt,sld:max,safree --concept=nudity,naked,nude \\
        --prompts=i2p=data/i2p_sexual.csv --prompts=coco=data/coco_prompts.txt \\
        --attack_prompts=data/nudity_prompts.csv --attacks=ring_a_bell,unlearndiff \\
        --blocklist=nude,naked,nudity,nsfw --detector=nudenet --clip=models/clip --out=workdir/compare

The toy benchmark's table (``python -m sc_dpo_jax.main --config=configs/toy.py``) for any diffusers Stable
Diffusion folders, judged by a detector (NudeNet by default) instead of the toy's exact judge. Rows: every
``--model`` (the first is the base model) and every ``--defences`` entry (the base model sampled with the
concept as negative prompt, with Safe Latent Diffusion, ``sld:<preset>``, or with the SAFREE-style projection;
``--concept`` names the concept for all three). Columns: the unsafe rate of each ``--prompts`` set and each
attack's success rate, with 95% Wilson intervals, and the mean CLIP score of each set with ``--clip``.

Attacks, as in the toy benchmark (``toy.red_team``): the ``--attack_prompts`` (unsafe prompts) pass a word
filter that removes the ``--blocklist`` words, giving the ``filtered`` set (the baseline, no attack);
``ring_a_bell`` (black-box) searches one prompt per filtered prompt on the base model's text encoder, with the
concept direction ``mean(E(prompt) - E(filtered prompt))``, and its prompts go to every row (the methods here
train the UNet: a model whose text encoder differs from the base's is warned about); ``unlearndiff``
(white-box) optimises prefix tokens through each model's UNet toward the base model's image of the unfiltered
prompt (the defences get the base model's prompts). Neither attack may use a blocked word.

Stages and resume (run the same command again to continue): ``<out>/attacks/`` holds the prompt files
(``filtered.jsonl``, ``ring_a_bell.jsonl``, resumed prompt by prompt, ``unlearndiff/<row>.jsonl``, one per
model) and the target images; ``<out>/rows/<row>/`` is each row's ``python -m sc_dpo_jax.eval`` output (resumed
batch by batch); ``<out>/compare.md`` and ``compare.json`` the table.
"""
from __future__ import annotations

import filecmp
import json
import os
import re
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from absl import flags, logging

from sc_dpo_jax.eval import metrics as metrics_lib
from sc_dpo_jax.eval import prompts as prompts_lib

ATTACKS = ("ring_a_bell", "unlearndiff")
DEFENCES = ("negative_prompt", "sld", "safree")
FILTERED = "filtered"
_ROW_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def parse_models(specs: Sequence[str]) -> List[Tuple[str, str]]:
  """``NAME=PATH`` (or ``PATH``, named after its folder) per model, the base first; names must be distinct."""
  out = []
  for spec in specs:
    name, sep, path = spec.partition("=")
    if not sep:
      name, path = os.path.basename(os.path.normpath(spec)), spec
    if not _ROW_NAME.match(name):
      raise ValueError(f"--model={spec}: the name {name!r} must be letters, digits, '_', '.' or '-'")
    out.append((name, path))
  names = [n for n, _ in out]
  if not out or len(set(names)) != len(names):
    raise ValueError(f"--model: give one or more models with distinct names, got {names}")
  return out


def defence_sampler(spec: str, concepts: Sequence[str]) -> Tuple[str, Dict[str, Any]]:
  """``(row name, arguments of pipe.generate)`` for a defence spec: ``negative_prompt``, ``sld`` / ``sld:<preset>``
  (default preset max), ``safree``; ``concepts`` are the concept's words."""
  name, _, arg = spec.strip().partition(":")
  if name not in DEFENCES:
    raise ValueError(f"--defences: unknown defence {spec!r}; known: {DEFENCES} (sld:<preset> for an SLD preset)")
  if not concepts:
    raise ValueError(f"--defences={spec}: give the concept with --concept (e.g. nudity,naked)")
  text = ", ".join(concepts)
  if name == "negative_prompt":
    return name, {"negative_prompt": text}
  if name == "sld":
    from sc_dpo_jax.diffusion import safe_guidance  # pylint: disable=g-import-not-at-top
    preset = arg or "max"
    return f"sld_{preset}", {"safety": safe_guidance.SLDConfig.preset(preset, concept=text)}
  from sc_dpo_jax.diffusion import prompt_projection  # pylint: disable=g-import-not-at-top
  return name, {"projection": prompt_projection.ProjectionConfig(concepts=tuple(concepts))}


def word_filter(text: str, blocklist: Sequence[str]) -> str:
  """``text`` with every ``blocklist`` word (as a whole word, any case) removed and spaces collapsed."""
  words = sorted({w.strip().lower() for w in blocklist if w.strip()}, key=len, reverse=True)
  if not words:
    return text
  pattern = re.compile(r"(?<![A-Za-z0-9])(" + "|".join(re.escape(w) for w in words) + r")(?![A-Za-z0-9])",
                       re.IGNORECASE)
  return re.sub(r"\s+", " ", pattern.sub(" ", text)).strip()


def _write_jsonl(path: str, records: Sequence[Mapping[str, Any]]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  os.replace(path + ".tmp", path)


def _text_encoder_differs(base: str, model: str) -> bool:
  from sc_dpo_jax.models import storage  # pylint: disable=g-import-not-at-top
  name = "text_encoder/model.safetensors"
  a, b = storage.join(base, name), storage.join(model, name)
  if not (os.path.exists(a) and os.path.exists(b)):
    return False
  return not filecmp.cmp(a, b, shallow=False)          # byte by byte, in chunks (SD's is 0.5 GB)


def make_attacks(models: Sequence[Tuple[str, str]], *, out_dir: str, attack_prompts: str, attacks: Sequence[str],
                 blocklist: Sequence[str], steps: int, guidance: float, seed: int, batch_size: int,
                 attack_limit: Optional[int] = None, prompt_column: str = "prompt",
                 ring_a_bell: Optional[Mapping[str, Any]] = None, unlearndiff: Optional[Mapping[str, Any]] = None,
                 attention: str = "reference", progress: bool = True) -> Dict[str, Any]:
  """The attack prompt files (module docstring): ``{"filtered": path, "ring_a_bell": path, "unlearndiff": {row:
  path}}`` for the attacks chosen."""
  from sc_dpo_jax import models as models_lib  # pylint: disable=g-import-not-at-top
  unknown = [a for a in attacks if a not in ATTACKS]
  if unknown:
    raise ValueError(f"--attacks: unknown {unknown}; known: {ATTACKS}")
  rows = prompts_lib.read_prompt_set(attack_prompts, column=prompt_column).limit(attack_limit).rows
  sources = [r.text for r in rows]
  filtered = [word_filter(t, blocklist) for t in sources]
  empty = [sources[i] for i, t in enumerate(filtered) if not t]
  if empty:
    raise ValueError(f"{attack_prompts}: the word filter (--blocklist) leaves nothing of {empty[:3]}")
  folder = os.path.join(out_dir, "attacks")
  paths: Dict[str, Any] = {FILTERED: os.path.join(folder, "filtered.jsonl")}
  _write_jsonl(paths[FILTERED], [{"prompt": f, "source_prompt": s, "target_index": i}
                                 for i, (f, s) in enumerate(zip(filtered, sources))])
  base_name, base_path = models[0]
  if "ring_a_bell" in attacks:
    from sc_dpo_jax.attack import ring_a_bell as rab  # pylint: disable=g-import-not-at-top
    s = dict(rab.DEFAULTS, **(ring_a_bell or {}))
    out = paths["ring_a_bell"] = os.path.join(folder, "ring_a_bell.jsonl")
    for name, path in models[1:]:
      if _text_encoder_differs(base_path, path):
        logging.warning("%s: its text encoder differs from the base model's; Ring-A-Bell searched on the base's",
                        name)
    done = rab.done_targets(out, filtered, eta=float(s["eta"]), length=int(s["length"]))
    if len(done) < len(filtered):
      text_model = rab.load_text_model(base_path, attention=attention)
      direction = rab.concept_direction(text_model, sources, filtered)
      rab.attack(text_model, filtered, direction=direction, blocklist=blocklist, seed=seed, progress=progress,
                 out=out, skip=done, **{k: s[k] for k in ("eta", "length", "population", "generations", "crossover",
                                                          "mutation", "elite", "tournament")})
  if "unlearndiff" in attacks:
    from sc_dpo_jax.attack import unlearndiff as ud  # pylint: disable=g-import-not-at-top
    s = dict(dict(length=5, steps=50, lr=0.01, timesteps_per_step=8, batch_size=1), **(unlearndiff or {}))
    targets_path = os.path.join(folder, "targets.npz")
    paths["unlearndiff"] = {name: os.path.join(folder, "unlearndiff", f"{name}.jsonl") for name, _ in models}
    todo = [(n, p) for n, p in models if not os.path.exists(paths["unlearndiff"][n])]
    if todo:
      if os.path.exists(targets_path):
        targets = np.load(targets_path)["images"]
      else:
        base = models_lib.load_pipeline(base_path, attention=attention)
        targets = base.generate(sources, seed=seed, steps=steps, guidance=guidance, batch_size=batch_size,
                                progress=progress)
        os.makedirs(folder, exist_ok=True)
        np.savez_compressed(targets_path, images=targets)
      for name, path in todo:
        start = time.time()
        pipe = models_lib.load_pipeline(path, attention=attention)
        results = ud.attack(pipe, filtered, targets, blocklist=blocklist, seed=seed, progress=progress,
                            **{k: s[k] for k in ("length", "steps", "lr", "timesteps_per_step", "batch_size")})
        ud.write_jsonl(paths["unlearndiff"][name], results, [{"target_index": i} for i in range(len(results))])
        logging.info("unlearndiff against %s: %d prompts in %.0f s", name, len(results), time.time() - start)
  return paths


def _rate(result: Mapping[str, Any], name: str) -> Dict[str, Any]:
  s = result["sets"][name]
  n, rate = int(s["images"]), s["model"]["nudity_rate"]
  k = int(round(rate * n))
  return {"unsafe_rate": rate, "k": k, "images": n, "interval": list(metrics_lib.wilson(k, n)),
          "clip_score": s["model"].get("clip_score")}


def compare(models: Sequence[Tuple[str, str]], prompt_sets: Sequence[str], *, out_dir: str,
            defences: Sequence[str] = (), concepts: Sequence[str] = (), attack_prompts: Optional[str] = None,
            attacks: Sequence[str] = ATTACKS, blocklist: Sequence[str] = (), detector: str = "nudenet",
            clip: Optional[str] = None, steps: int = 50, guidance: float = 7.5, seed: int = 0, num_images: int = 1,
            batch_size: int = 8, limit: Optional[int] = None, attack_limit: Optional[int] = None,
            prompt_column: str = "prompt", ring_a_bell: Optional[Mapping[str, Any]] = None,
            unlearndiff: Optional[Mapping[str, Any]] = None, attention: str = "reference",
            progress: bool = True) -> Dict[str, Any]:
  """Runs the comparison of the module docstring; returns ``compare.json``'s content (with ``markdown``: the
  table's path)."""
  from sc_dpo_jax.eval import run as run_lib  # pylint: disable=g-import-not-at-top
  start = time.time()
  rows = [(name, path, {}) for name, path in models]
  for spec in defences:
    name, sampler = defence_sampler(spec, concepts)
    rows.append((name, models[0][1], sampler))
  names = [r[0] for r in rows]
  if len(set(names)) != len(names):
    raise ValueError(f"rows {names}: a defence has the name of a model or another defence")
  plain = prompts_lib.read_prompt_sets(list(prompt_sets), column=prompt_column, limit=limit) if prompt_sets else []
  clash = [s.name for s in plain if s.name in (FILTERED,) + ATTACKS]
  if clash:
    raise ValueError(f"--prompts: the set names {clash} are the attack sets'; name them otherwise (NAME=PATH)")
  attacks = tuple(attacks) if attack_prompts else ()
  paths = make_attacks(models, out_dir=out_dir, attack_prompts=attack_prompts, attacks=attacks,
                       blocklist=blocklist, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size,
                       attack_limit=attack_limit, prompt_column=prompt_column, ring_a_bell=ring_a_bell,
                       unlearndiff=unlearndiff, attention=attention, progress=progress) if attack_prompts else {}
  table: Dict[str, Dict[str, Any]] = {}
  for name, path, sampler in rows:
    sets: List[Any] = list(plain)
    if attack_prompts:
      sets.append(f"{FILTERED}={paths[FILTERED]}")
      if "ring_a_bell" in paths:
        sets.append(f"ring_a_bell={paths['ring_a_bell']}")
      if "unlearndiff" in paths:
        sets.append(f"unlearndiff={paths['unlearndiff'].get(name, paths['unlearndiff'][models[0][0]])}")
    logging.info("compare: row %s (%s%s)", name, path, f", {', '.join(sampler)}" if sampler else "")
    result = run_lib.evaluate(path, sets, out_dir=os.path.join(out_dir, "rows", name), detector=detector, clip=clip,
                              steps=steps, guidance=guidance, seed=seed, num_images=num_images,
                              batch_size=batch_size, prompt_column=prompt_column, attention=attention,
                              progress=progress, **sampler)
    table[name] = {s: _rate(result, s) for s in result["sets"]}
  columns = [s.name for s in plain] + ([FILTERED] + [a for a in ATTACKS if a in paths] if attack_prompts else [])
  summary = {"rows": table, "columns": columns, "models": dict(models), "defences": list(defences),
             "concepts": list(concepts), "blocklist": list(blocklist), "detector": detector,
             "sampling": {"steps": steps, "guidance": guidance, "seed": seed, "num_images": num_images},
             "seconds": time.time() - start}
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "compare.json"), "w") as f:
    json.dump(summary, f, indent=2)          # rows in order: the models, then the defences
  md = os.path.join(out_dir, "compare.md")
  with open(md, "w") as f:
    f.write(markdown(summary))
  summary["markdown"] = md
  return summary


def _cell(r: Optional[Mapping[str, Any]]) -> str:
  if not r or r["unsafe_rate"] is None:
    return "-"
  lo, hi = r["interval"]
  return f"{r['unsafe_rate']:.3f} [{lo:.2f}, {hi:.2f}] (n={r['images']})"


def markdown(summary: Mapping[str, Any]) -> str:
  cols, rows = summary["columns"], summary["rows"]
  attack_cols = [c for c in cols if c == FILTERED or c in ATTACKS]
  lines = ["# Models, defences and attacks", "",
           f"Detector {summary['detector']}; DDIM {summary['sampling']['steps']} steps, guidance "
           f"{summary['sampling']['guidance']}, seed {summary['sampling']['seed']}; the same prompts and noise for "
           "every row. Each cell: the share of images the detector flags (the unsafe rate; on an attack's set, "
           "its success rate) with its 95% Wilson interval and the number of images.", "",
           "Rows: " + ", ".join(f"{n} ({p})" for n, p in summary["models"].items()) + " (the first is the base)"
           + (f"; training-free defences of the base: {', '.join(summary['defences'])} (concept: "
              f"{', '.join(summary['concepts'])})" if summary["defences"] else "") + ".", ""]
  if attack_cols:
    lines += [f"Attacks: behind a word filter that removes {', '.join(summary['blocklist']) or 'nothing'}; "
              "*filtered*: the attacked prompts as the filter leaves them (no attack); *ring_a_bell*: black-box, "
              "one prompt set searched on the base's text encoder for every row; *unlearndiff*: white-box, "
              "prefix tokens optimised through each model's UNet (a defence gets the base's).", ""]
  lines += ["| row | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for name, sets in rows.items():
    lines.append(f"| {name} | " + " | ".join(_cell(sets.get(c)) for c in cols) + " |")
  clip_cols = [c for c in cols if any((rows[n].get(c) or {}).get("clip_score") is not None for n in rows)]
  if clip_cols:
    lines += ["", "Mean CLIP score per set:", "", "| row | " + " | ".join(clip_cols) + " |",
              "|---" * (len(clip_cols) + 1) + "|"]
    for name, sets in rows.items():
      lines.append(f"| {name} | " + " | ".join(
          f"{sets[c]['clip_score']:.3f}" if sets.get(c) and sets[c].get("clip_score") is not None else "-"
          for c in clip_cols) + " |")
  lines += ["", "Each row's full evaluation (images, records, report): `rows/<row>/`; the attack prompts: "
            "`attacks/`.", ""]
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- CLI
FLAGS = flags.FLAGS
_FLAGS = (
    ("multi_string", "model", None, "NAME=PATH of a diffusers Stable Diffusion folder; repeat; the first is the base.",
     {}),
    ("multi_string", "prompts", [], "A prompt set (PATH or NAME=PATH: .csv, .jsonl, .txt); repeat for several.", {}),
    ("list", "defences", [], "Training-free defences of the base: negative_prompt, sld[:PRESET], safree.", {}),
    ("list", "concept", [], "The unsafe concept's words, for the defences (e.g. nudity,naked).", {}),
    ("string", "attack_prompts", None, "Unsafe prompts to attack (a prompt file); no attacks without it.", {}),
    ("list", "attacks", list(ATTACKS), "Attacks on --attack_prompts: ring_a_bell, unlearndiff.", {}),
    ("list", "blocklist", [], "The word filter: words removed from the attacked prompts, barred from the attacks.",
     {}),
    ("integer", "attack_limit", None, "Only the first N attack prompts.", {}),
    ("float", "rab_eta", 3.0, "Ring-A-Bell: strength of the concept direction.", {}),
    ("integer", "rab_length", 16, "Ring-A-Bell: tokens per prompt.", {}),
    ("integer", "rab_population", 200, "Ring-A-Bell: GA population.", {}),
    ("integer", "rab_generations", 1000, "Ring-A-Bell: GA generations.", {}),
    ("integer", "rab_elite", 10, "Ring-A-Bell: best sequences kept each generation (< population).", {}),
    ("integer", "ud_length", 5, "UnlearnDiff: prefix tokens.", {}),
    ("integer", "ud_steps", 50, "UnlearnDiff: optimisation steps.", {}),
    ("float", "ud_lr", 0.01, "UnlearnDiff: Adam learning rate.", {}),
    ("integer", "ud_timesteps_per_step", 8, "UnlearnDiff: (t, eps) pairs per prompt and step.", {}),
    ("integer", "ud_batch_size", 1, "UnlearnDiff: prompts optimised together.", {}),
    ("string", "detector", "nudenet", "nudenet, nudenet:<threshold> or toy:<colour>.", {}),
    ("string", "clip", None, "A transformers CLIPModel folder for CLIP scores.", {}),
    ("integer", "steps", 50, "DDIM steps.", {}),
    ("float", "guidance", 7.5, "Guidance scale.", {}),
    ("integer", "seed", 0, "Seed of the images and the attacks.", {}),
    ("integer", "num_images", 1, "Images per prompt.", {}),
    ("integer", "batch_size", 8, "Images per sampling batch.", {}),
    ("integer", "limit", None, "Only the first N prompts of each set (smoke runs).", {}),
    ("string", "prompt_column", "prompt", "The prompt column (CSV) or field (JSONL).", {}),
    ("string", "out", "workdir/compare", "Output folder.", {}),
    ("enum", "attention", "reference", "Attention kernel.", {"enum_values": ["reference", "xla", "cudnn"]}),
    ("bool", "progress", True, "Show progress bars.", {}),
)


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  from sc_dpo_jax.attack import define_flag_table  # pylint: disable=g-import-not-at-top
  define_flag_table(_FLAGS, flag_values)


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = {name: FLAGS[name].value for _, name, _, _, _ in _FLAGS}
  if not f["model"]:
    raise app.UsageError("--model=NAME=PATH is required (the first is the base model)")
  if not f["prompts"] and not f["attack_prompts"]:
    raise app.UsageError("give --prompts and/or --attack_prompts")
  try:
    models = parse_models(f["model"])
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  result = compare(models, f["prompts"], out_dir=f["out"], defences=f["defences"], concepts=f["concept"],
                   attack_prompts=f["attack_prompts"], attacks=f["attacks"], blocklist=f["blocklist"],
                   detector=f["detector"], clip=f["clip"], steps=f["steps"], guidance=f["guidance"], seed=f["seed"],
                   num_images=f["num_images"], batch_size=f["batch_size"], limit=f["limit"],
                   attack_limit=f["attack_limit"], prompt_column=f["prompt_column"],
                   ring_a_bell=dict(eta=f["rab_eta"], length=f["rab_length"], population=f["rab_population"],
                                    generations=f["rab_generations"], elite=f["rab_elite"]),
                   unlearndiff=dict(length=f["ud_length"], steps=f["ud_steps"], lr=f["ud_lr"],
                                    timesteps_per_step=f["ud_timesteps_per_step"], batch_size=f["ud_batch_size"]),
                   attention=f["attention"], progress=f["progress"])
  print(f"compare: the table is in {os.path.abspath(result['markdown'])}")


if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=g-import-not-at-top
  define_flags()
  _app.run(main)
