"""A grid of toy-world runs: test an idea on a laptop before spending GPU days.

    python -m sc_dpo_jax.toy.sweep --config=configs/toy.py --workdir=workdir/sweep --config.methods=sc_dpo \\
        --sweep sc_dpo.objective.beta=100,200,400 --sweep sc_dpo.train.steps=120,240

Every combination of the ``--sweep KEY=V1,V2,...`` values (any key of the toy config, scalars only) is one
point, run by the demo (``toy.demo.run``) with those overrides on top of ``--config`` (itself overridable as
usual, e.g. ``--config.methods=sc_dpo`` or ``--config.seeds=0,1,2``). Points share what they do not change: the
cost model and datasets live in ``shared/stages-<hash of the sections they read>``, each method's training in
``runs/<method>-<hash of its config and stages>/seed<k>`` and the base model's evaluation in
``shared/base-eval-<hash>``, so a sweep of SC-DPO's beta trains the cost model once and reuses it for every beta,
and a point that another sweep (or an earlier run of this one) already trained is not trained again. Everything
is resumable: run the same command again and only what is missing runs.

Written to ``--workdir``: ``points/<name>/report`` (each point's full report), ``sweep.md`` and ``sweep.json``
(one row per point and method: safe-and-intact on unsafe prompts and retention on safe prompts with their 95%
intervals, broken images, the direct unsafe rate, whether the row is on the Pareto front) and ``pareto.png``
(safe-and-intact against retention, one point per run, intervals as bars, the front joined).
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from sc_dpo_jax.toy import demo, red_team, report

# Sections of the toy config each shared stage reads (a sweep key under one of them gives it its own folder).
STAGE_SECTIONS = demo.STAGE_SECTIONS     # what the cost model and the datasets read
EVAL_SECTIONS = ("world", "base", "sampling", "eval", "attack")


@dataclasses.dataclass(frozen=True)
class Axis:
  key: str
  values: Tuple[Any, ...]


def _lookup(config: ml_collections.ConfigDict, key: str):
  node = config
  parts = key.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      where = ".".join(parts[:i]) or "the config"
      known = sorted(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
      raise KeyError(f"--sweep {key}: {where} has no key {part!r}" + (f"; it has {known}" if known else ""))
    node = node[part]
  return node


def _parse(key: str, text: str, current) -> Any:
  text = text.strip()
  if isinstance(current, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ValueError(f"--sweep {key}: {text!r} is not a boolean (true/false)")
  for kind in (int, float):
    if isinstance(current, kind):
      try:
        return kind(float(text)) if kind is int and float(text).is_integer() else kind(text)
      except ValueError:
        raise ValueError(f"--sweep {key}: {text!r} is not a{'n' if kind is int else ''} {kind.__name__}") from None
  if isinstance(current, str) or current is None:
    return text
  raise ValueError(f"--sweep {key}: only scalar keys can be swept (it holds a {type(current).__name__}); set it "
                   f"with --config.{key}=... instead")


def parse_axes(config: ml_collections.ConfigDict, specs: Sequence[str]) -> List[Axis]:
  """``["KEY=V1,V2", ...]`` -> axes, each value parsed to the type of the config's current value; errors name
  the spec and the key."""
  axes = []
  for spec in specs:
    if "=" not in spec:
      raise ValueError(f"--sweep {spec!r}: expected KEY=V1,V2,... (e.g. sc_dpo.objective.beta=100,200)")
    key, _, values = spec.partition("=")
    key = key.strip()
    current = _lookup(config, key)
    if isinstance(current, (ml_collections.ConfigDict, dict)):
      raise ValueError(f"--sweep {key}: is a section, not a value")
    parsed = tuple(_parse(key, v, current) for v in values.split(",") if v.strip())
    if not parsed:
      raise ValueError(f"--sweep {spec!r}: no values")
    if key in (a.key for a in axes):
      raise ValueError(f"--sweep {key} is given twice")
    axes.append(Axis(key, parsed))
  return axes


def _set(config: ml_collections.ConfigDict, key: str, value) -> None:
  *path, last = key.split(".")
  node = config
  for part in path:
    node = node[part]
  node[last] = value


def points(config: ml_collections.ConfigDict, axes: Sequence[Axis]) -> List[Tuple[str, Dict[str, Any],
                                                                                   ml_collections.ConfigDict]]:
  """``(name, overrides, config)`` of every grid point, in row-major order of the axes."""
  out = []
  for values in itertools.product(*(a.values for a in axes)):
    overrides = {a.key: v for a, v in zip(axes, values)}
    c = ml_collections.ConfigDict(config.to_dict())
    for key, value in overrides.items():
      _set(c, key, value)
    name = "__".join(f"{key}={value}" for key, value in overrides.items()) or "default"
    out.append((re.sub(r"[^A-Za-z0-9_.=+-]", "_", name), overrides, c))
  return out


def fingerprint(config: ml_collections.ConfigDict, sections: Sequence[str], *extra: Any) -> str:
  """A short hash of ``config``'s ``sections`` (and ``extra``): equal for points that share a stage."""
  text = json.dumps([demo.config_sections(config, sections), extra], sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:10]


def point_layout(workdir: str, config: ml_collections.ConfigDict, name: str) -> demo.Layout:
  stages = fingerprint(config, STAGE_SECTIONS, demo.base_identity(demo.base_folder(config))["sha256"])
  base_eval = fingerprint(config, EVAL_SECTIONS)

  def run(method: str, seed: int) -> str:
    return os.path.join(workdir, "runs", f"{method}-{fingerprint(config, (method,), stages)}", f"seed{seed}")

  return demo.Layout(stages=os.path.join(workdir, "shared", f"stages-{stages}"), run=run,
                     base_eval=os.path.join(workdir, "shared", f"base-eval-{base_eval}"),
                     report=os.path.join(workdir, "points", name, "report"), named_by_settings=True)


def pareto(rows: Sequence[Mapping[str, Any]]) -> List[bool]:
  """Whether each row is on the front of (retention, safe_and_intact), both to maximise."""
  xy = [(r["retention"], r["safe_and_intact"]) for r in rows]
  return [not any(x2 >= x and y2 >= y and (x2, y2) != (x, y) for x2, y2 in xy) for x, y in xy]


def table(results: Sequence[Tuple[str, Mapping[str, Any], Mapping[str, Any]]]) -> List[Dict[str, Any]]:
  """One row per point and model from ``(name, overrides, report summary)``; the base once, and each
  training-free defence once unless the point overrides the ``defence`` settings (they are the base model
  sampled another way: the same at every point); a point that overrides the ``attack`` settings gets its own
  base and defence rows (their attack success rates change). ``attacks``: each attack's success rate."""
  rows, done = [], set()
  for name, overrides, summary in results:
    attacked = any(k == "attacks" or k.startswith("attack.") for k in overrides)
    for model, head in summary["headline"].items():
      shared = not attacked and (model == "base" or (model in demo.DEFENCES and not any(
          k == "defences" or k.startswith("defence.") for k in overrides)))
      if shared:
        if model in done:
          continue
        done.add(model)
      u, s = head["unsafe_prompts"], head["safe_prompts"]
      rows.append({"point": "-" if shared else name, "model": model,
                   "overrides": {} if shared else dict(overrides),
                   "safe_and_intact": u["safe_and_intact"],
                   "safe_and_intact_interval": u["intervals"]["safe_and_intact"],
                   "retention": s["retention"], "retention_interval": s["intervals"]["retention"],
                   "broken_rate": u["broken_rate"], "unsafe_rate": u["unsafe_rate"],
                   "direct_unsafe_rate": summary["models"][model]["direct"]["unsafe_rate"],
                   "seeds": u.get("seeds", 1),
                   "attacks": {a: r["unsafe_rate"] for a, r in summary.get("attacks", {}).get(model, {}).items()}})
  for row, front in zip(rows, pareto(rows)):
    row["pareto"] = front
  return rows


def _plot(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
  points = []
  for row in rows:
    label = "base" if row["model"] == "base" else (
        f"{row['model']} " + ", ".join(f"{k.split('.')[-1]}={v}" for k, v in row["overrides"].items()))
    points.append(dict(row, label=label, base=row["model"] == "base", front=row["pareto"]))
  report.plot_tradeoff(path, points, title="toy sweep: one point per run, 95% intervals; dashed: Pareto front")


def _fmt(value, interval) -> str:
  return f"{value:.3f} [{interval[0]:.2f}, {interval[1]:.2f}]"


def write(workdir: str, axes: Sequence[Axis], rows: Sequence[Mapping[str, Any]]) -> str:
  """``sweep.json``, ``sweep.md`` and ``pareto.png`` in ``workdir``; returns the markdown's path."""
  with open(os.path.join(workdir, "sweep.json"), "w") as f:
    json.dump({"axes": [dataclasses.asdict(a) for a in axes], "rows": list(rows)}, f, indent=2, default=str)
  keys = [a.key for a in axes]
  attacks = [a for a in red_team.ATTACKS if any(a in r.get("attacks", {}) for r in rows)]
  lines = ["# Toy sweep", "", "Axes: " + "; ".join(f"`{a.key}` = {', '.join(map(str, a.values))}" for a in axes),
           "", "| model | " + " | ".join(keys) + " | safe & intact (unsafe prompts) | retention (safe prompts) | "
           "broken (unsafe prompts) | unsafe: direct | " + "".join(f"attack: {a} | " for a in attacks) +
           "seeds | Pareto |", "|---" * (len(keys) + 7 + len(attacks)) + "|"]
  for r in rows:
    values = [str(r["overrides"].get(k, "-")) for k in keys]
    rates = "".join(f"{r['attacks'][a]:.3f} | " if a in r.get("attacks", {}) else "- | " for a in attacks)
    lines.append(f"| {r['model']} | " + " | ".join(values) +
                 f" | {_fmt(r['safe_and_intact'], r['safe_and_intact_interval'])}"
                 f" | {_fmt(r['retention'], r['retention_interval'])} | {r['broken_rate']:.3f} | "
                 f"{r['direct_unsafe_rate']:.3f} | {rates}{r['seeds']} | {'yes' if r['pareto'] else ''} |")
  lines += ["", "![Pareto](pareto.png)", "", "Each point's full report: `points/<point>/report/report.md`.", ""]
  _plot(os.path.join(workdir, "pareto.png"), rows)
  path = os.path.join(workdir, "sweep.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path


def sweep(config: ml_collections.ConfigDict, workdir: str, specs: Sequence[str]) -> Dict[str, Any]:
  """Runs every point of the grid (see the module docstring); returns ``{"rows", "markdown"}``."""
  workdir = os.path.abspath(workdir)
  axes = parse_axes(config, specs)
  grid = points(config, axes)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  results = []
  for i, (name, overrides, c) in enumerate(grid):
    logging.info("sweep point %d/%d: %s", i + 1, len(grid), name)
    print(f"sweep point {i + 1}/{len(grid)}: {name}", flush=True)
    summary = demo.run(c, workdir, point_layout(workdir, c, name))
    results.append((name, overrides, summary))
  rows = table(results)
  md = write(workdir, axes, rows)
  print(f"\nThe sweep's table is in {md}\n")
  return {"rows": rows, "markdown": md}


_CONFIG = config_flags.DEFINE_config_file("config", None, "the toy config file (configs/toy.py[:variant])",
                                          lock_config=True)
flags.DEFINE_string("workdir", None, "the sweep's folder (relative or absolute); reused to resume")
flags.DEFINE_multi_string("sweep", [], "KEY=V1,V2,...: one axis of the grid (repeat for more axes)")


def main(argv):
  del argv
  if not flags.FLAGS.workdir:
    raise app.UsageError("--workdir=DIR is required")
  config = _CONFIG.value
  if config is None or config.get("job") != "toy":
    raise app.UsageError("--config must be the toy config (configs/toy.py[:variant])")
  sweep(config, flags.FLAGS.workdir, flags.FLAGS.sweep)


if __name__ == "__main__":
  app.run(main)
