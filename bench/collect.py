"""Gathers the runs of ``bench/run_gpu.sh`` into one ``results.json`` and the Markdown table of issue 9.

    python bench/collect.py RUNS_DIR --out OUT_DIR [--command "..."]

``RUNS_DIR`` holds ``status.tsv`` (name, status, seconds, command; one line per run, written by run_gpu.sh),
each run's ``<name>.json`` and ``<name>.log``, and ``gpu_tests.xml`` (pytest's JUnit report of tests/gpu).
Writes ``OUT_DIR/results.json`` ({"runs": {name: {"status", "seconds", "command", "result"}}, "pytest": ...})
and ``OUT_DIR/table.md`` (the docs/performance.md table, our figures beside the peers', the numerics checks
and the top costs of both profiles), and prints the table. Standard library only (the peer's
environment may lack our package); the kernel categories come from sc_dpo_jax.profiling when it imports.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import xml.etree.ElementTree as ET

SD15_PAIR_TFLOP = 5.42        # issue 9: 677 GFLOP per UNet forward per image x 8 forward-equivalents per pair
PEAK_SPEC_TFLOPS = 989.0      # H100 SXM / H200 dense bf16 (data sheet)
PEAK_MEASURED_TFLOPS = 798.0  # issue 9: measured bf16 matmul peak
GOALS = {"step": "≥ 60", "memory": "≤ 25", "sample": "≥ 5.5", "duo_memory": "clearly < full fine-tuning"}


def read_runs(runs_dir: str):
  status_path = os.path.join(runs_dir, "status.tsv")
  if not os.path.exists(status_path):
    raise FileNotFoundError(f"{status_path} not found: run bench/run_gpu.sh first")
  runs = {}
  with open(status_path) as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      fields = line.rstrip("\n").split("\t")
      if len(fields) != 4:
        raise ValueError(f"{status_path}:{line_no}: expected 4 tab-separated fields (name, status, seconds, "
                         f"command), got {len(fields)}")
      name, status, seconds, command = fields
      result = None
      path = os.path.join(runs_dir, f"{name}.json")
      if os.path.exists(path):
        with open(path) as g:
          try:
            result = json.load(g)
          except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from e
      runs[name] = {"status": status, "seconds": float(seconds), "command": command, "result": result}
  return runs


def read_pytest(path: str):
  """Counts of a JUnit XML report: tests, failures, errors, skipped, passed; and the failed test ids."""
  if not os.path.exists(path):
    return None
  root = ET.parse(path).getroot()
  suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
  counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
  counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
  counts["failed_ids"] = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
                          if case.find("failure") is not None or case.find("error") is not None]
  return counts


def _result(runs, name):
  run = runs.get(name)
  return run["result"] if run and run["status"] == "ok" and run["result"] else None


def _cell(runs, name, key, fmt="{:.2f}"):
  run = runs.get(name)
  if run is None:
    return "not run"
  if run["status"] != "ok":
    return {"skipped": "not run (time budget)", "timeout": "timed out"}.get(run["status"],
                                                                          f"FAILED (runs/{name}.log)")
  value = (run["result"] or {}).get(key)
  return "n/a" if value is None else fmt.format(value)


def _mfu(runs, name):
  r = _result(runs, name)
  if not r or r.get("pairs_per_s") is None:
    return ""
  if r.get("architecture", r.get("arch")) != "sd15":
    return " (tiny)"
  tflops = r["pairs_per_s"] * SD15_PAIR_TFLOP
  return (f" ({tflops:.0f} TFLOP/s; MFU {100 * tflops / PEAK_SPEC_TFLOPS:.0f}% of {PEAK_SPEC_TFLOPS:.0f}, "
          f"{100 * tflops / PEAK_MEASURED_TFLOPS:.0f}% of {PEAK_MEASURED_TFLOPS:.0f})")


def _categories(profile):
  try:
    from sc_dpo_jax import profiling  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  shares = {}
  for row in profile.get("top", []):
    category = profiling.categorize(row["name"])
    shares[category] = shares.get(category, 0.0) + row["share"]
  return shares


def _profile_section(title, profile, n=10):
  if not profile:
    return [f"### {title}", "", "(no profile)", ""]
  if "error" in profile:
    return [f"### {title}", "", f"(the profiler failed: {profile['error']})", ""]
  lines = [f"### {title}", "",
           f"{profile.get('source', '?')}: {profile.get('device_ms_per_step', 0):.1f} ms of kernels per step"
           + (f", busy {100 * profile['busy_share']:.0f}% of {profile['wall_ms_per_step']:.1f} ms wall"
              if "busy_share" in profile else "")]
  categories = profile.get("categories") or _categories(profile)
  if categories:
    lines.append("by category" + ("" if profile.get("categories") else " (top kernels only)") + ": "
                 + ", ".join(f"{k} {100 * v:.1f}%" for k, v in sorted(categories.items(), key=lambda kv: -kv[1])))
  lines += ["", "| kernel | ms per step | share | calls per step |", "|---|---|---|---|"]
  for row in profile.get("top", [])[:n]:
    name = row["name"].replace("|", "\\|")
    name = name if len(name) <= 100 else name[:97] + "..."
    lines.append(f"| `{name}` | {row['ms_per_step']:.2f} | {100 * row['share']:.1f}% | "
                 f"{row.get('calls_per_step', 0):.0f} |")
  return lines + [""]


def table(runs, pytest_counts, command=""):
  device = next((r["result"].get("device_kind") or r["result"].get("device_name") for r in runs.values()
                 if r["result"] and (r["result"].get("device_kind") or r["result"].get("device_name"))), "?")
  lines = [f"Device: {device}." + (f" Command: `{command}`." if command else ""), "",
           "| workload | peer: eager, AMP bf16 | peer: torch.compile | ours (JAX/XLA) | goal |",
           "|---|---|---|---|---|"]
  step = lambda n: _cell(runs, n, "pairs_per_s") + _mfu(runs, n)  # noqa: E731
  lines.append(f"| Diffusion-DPO step, pairs/s (ours: remat `convs_and_dots_saveable`) | {step('peer_step_eager')} | "
               f"{step('peer_step_compile')} | {step('ours_diffusion_dpo')} | {GOALS['step']} |")
  lines.append(f"| Diffusion-DPO step without remat, pairs/s | | | {step('ours_dpo_noremat')} | "
               f"{GOALS['step']} |")
  lines.append(f"| SC-DPO step, pairs/s | (= Diffusion-DPO's) | (= Diffusion-DPO's) | {step('ours_sc_dpo')} | "
               f"{GOALS['step']} |")
  mem = lambda n: _cell(runs, n, "peak_memory_gb", "{:.1f}")  # noqa: E731
  lines.append(f"| peak memory, Diffusion-DPO step, GB | {mem('peer_step_eager')} | {mem('peer_step_compile')} | "
               f"{mem('ours_diffusion_dpo')} | {GOALS['memory']} |")
  lines.append(f"| peak memory, Diffusion-DPO step without remat, GB | | | {mem('ours_dpo_noremat')} | "
               f"{GOALS['memory']} |")
  lines.append(f"| DDIM + CFG + VAE decode, images/s | {_cell(runs, 'peer_sample_eager', 'images_per_s')} | "
               f"{_cell(runs, 'peer_sample_compile', 'images_per_s')} | {_cell(runs, 'ours_sample', 'images_per_s')} | "
               f"{GOALS['sample']} |")
  lines.append(f"| peak memory, sampling, GB | {mem('peer_sample_eager')} | {mem('peer_sample_compile')} | "
               f"{mem('ours_sample')} | |")
  lines.append(f"| DUO LoRA step, pairs/s | (no LoRA peer) | | {step('ours_duo_lora')} | |")
  lines.append(f"| peak memory, DUO LoRA step, GB | | | {mem('ours_duo_lora')} | {GOALS['duo_memory']} |")
  compile_cells = []
  for name, key in (("peer_step_eager", "warmup_s"), ("peer_step_compile", "warmup_s"),
                    ("ours_diffusion_dpo", "compile_s")):
    compile_cells.append(_cell(runs, name, key, "{:.0f}"))
  lines.append(f"| step: warm-up (peer) / AOT compile (ours), s | {' | '.join(compile_cells)} | |")
  lines.append("")
  shapes = {n: _result(runs, n) for n in ("ours_diffusion_dpo", "ours_sample", "peer_step_eager",
                                          "peer_sample_eager")}
  for name, r in shapes.items():
    if r:
      batch = f"{r['batch_pairs']} pairs" if "batch_pairs" in r else f"batch {r.get('batch')}"
      extra = f", {r['sample_steps']} DDIM steps, guidance {r['guidance']}" if "sample_steps" in r else ""
      lines.append(f"- {name}: {r.get('architecture', r.get('arch'))}, {batch}{extra}, "
                   f"{r.get('dtype', 'AMP bf16')}, attention {r.get('attention', 'diffusers default')}")
  lines += ["", "## Numerics on this device", ""]
  check = runs.get("ours_check")
  if check and check["result"]:
    c = check["result"]
    lines.append(f"- {c['dtype']} forward of the {c['architecture']} UNet ({c.get('weights', 'random')} weights) "
                 f"against float32 (highest precision): relative L2 **{c['forward_rel_l2_vs_float32']:.2e}** "
                 f"(rounding the weights alone: {c.get('weights_only_rel_l2', float('nan')):.2e}; "
                 f"goal ≤ {c['forward_rel_tol']:g}: "
                 f"{'met' if c['forward_ok'] else 'MISSED'}); XLA counts {c.get('forward_gflop_per_image_xla', 0):.4g} "
                 f"GFLOP per image for that forward")
    for a in c["attention_checks"]:
      lines.append(f"- attention `{c['attention']}` vs reference, {a['shape']}, {a['heads']}x{a['head_dim']} "
                   f"{a['dtype']}: output max abs {a['out_max_abs']:.1e}, gradients rel L2 "
                   f"{a['grad_max_rel_l2']:.1e} ({'ok' if a['ok'] else 'FAILED'})")
  else:
    lines.append(f"- numerics check: {_cell(runs, 'ours_check', 'ok')}")
  if pytest_counts:
    lines.append(f"- `pytest tests/gpu`: {pytest_counts['passed']} passed, {pytest_counts['failures']} failed, "
                 f"{pytest_counts['errors']} errors, {pytest_counts['skipped']} skipped"
                 + (f" (failed: {', '.join(pytest_counts['failed_ids'])})" if pytest_counts["failed_ids"] else ""))
  else:
    lines.append("- `pytest tests/gpu`: not run")
  lines += ["", "## Top costs", ""]
  lines += _profile_section("ours, Diffusion-DPO step", (_result(runs, "ours_diffusion_dpo") or {}).get("profile"))
  lines += _profile_section("peer, eager step", (_result(runs, "peer_step_eager") or {}).get("profile"))
  lines += _profile_section("ours, sampling", (_result(runs, "ours_sample") or {}).get("profile"))
  lines += ["## Runs", "", "| run | status | seconds |", "|---|---|---|"]
  lines += [f"| {name} | {run['status']} | {run['seconds']:.0f} |" for name, run in runs.items()]
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("runs_dir")
  p.add_argument("--out", required=True, help="Folder for results.json and table.md.")
  p.add_argument("--command", default="", help="The command that produced the runs (for the table).")
  args = p.parse_args(argv)
  runs = read_runs(args.runs_dir)
  pytest_counts = read_pytest(os.path.join(args.runs_dir, "gpu_tests.xml"))
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({"runs": runs, "pytest": pytest_counts, "command": args.command}, f, indent=2)
  text = table(runs, pytest_counts, args.command)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(text)
  print(text)
  return runs


if __name__ == "__main__":
  sys.exit(0 if main() is not None else 1)
