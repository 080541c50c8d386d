"""Where a compiled step spends its time: capture a ``jax.profiler`` trace and rank the device's kernels.

    summary = profiling.profile(lambda: step(...), steps=2, logdir="/tmp/trace")
    print(profiling.format_summary(summary))

:func:`profile` runs a callable under ``jax.profiler.trace`` (which also writes the TensorBoard/XProf
``.xplane.pb`` for a closer look) and :func:`summarize` reads the Perfetto trace it writes
(``*.trace.json.gz``, Chrome trace-event format): complete events on the device's timelines
(``/device:GPU:0`` streams; on a CPU, XLA's executor threads of ``/host:CPU``), summed by name, ranked, and
grouped into categories (matmul, convolution, attention, fusion, copy, collective, other) so that the benchmark
can say what limits a step. Shares are of summed kernel time, which on a GPU is close to the step's wall time
when the device is never idle (see ``busy_share``: kernel time over the profiled wall time).

:func:`compiled_flops` and :func:`compiled_memory_gb` read XLA's own analyses of a compiled program (the
trainer's TFLOP/s, the benchmark's figures).
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import time
from typing import Callable, Dict, List, Optional

# First match wins; patterns are matched against the lower-cased kernel (or XLA op) name.
CATEGORIES = (
    ("attention", r"flash|fmha|sdpa|cudnn_?attn|attention|softmax"),
    ("convolution", r"conv|xmma_fprop|xmma_dgrad|xmma_wgrad|implicit_gemm|winograd|cudnn"),
    ("matmul", r"gemm|matmul|cutlass|sm\d+_xmma|dot|cublas|nvjet|wgmma"),
    ("collective", r"nccl|all-?reduce|all-?gather|reduce-?scatter|collective"),
    ("copy", r"memcpy|memset|copy|transpose"),
    ("fusion", r"fusion|loop_|input_|reduce|elementwise|triton"),
)

# Events that are a thread waiting, not working (CPU executors); left out of the kernel time.
WAIT = re.compile(r"wait for completion|\bwait\b|::await\b", re.IGNORECASE)


def base_name(name: str) -> str:
  """A kernel or XLA op name without its instance number: ``loop_add_fusion.12`` -> ``loop_add_fusion``."""
  return re.sub(r"(?:[._]\d+)+$", "", name) or name


def categorize(name: str) -> str:
  lower = name.lower()
  for category, pattern in CATEGORIES:
    if re.search(pattern, lower):
      return category
  return "other"


def compiled_flops(compiled) -> Optional[float]:
  """FLOPs of a compiled program by XLA's cost analysis (per device); None where the backend gives none."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # cost analysis is best effort: not every backend has it
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  value = (analysis or {}).get("flops")
  return float(value) if value and value > 0 else None


def compiled_memory_gb(compiled) -> Optional[Dict[str, float]]:
  """XLA's buffer sizes of a compiled program in GB (arguments, outputs, aliased = donated, temporaries,
  code, and the peak where given); None where the backend gives none."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    return None
  if m is None:
    return None
  out = {f: getattr(m, f"{f}_size_in_bytes", 0) / 1e9 for f in ("argument", "output", "alias", "temp",
                                                                 "generated_code")}
  peak = getattr(m, "peak_memory_in_bytes", 0)
  if peak:
    out["peak"] = peak / 1e9
  return out


def profile(fn: Callable[[], object], *, steps: int, logdir: str, top: int = 15) -> Dict:
  """Runs ``fn`` ``steps`` times under a profiler trace into ``logdir``; :func:`summarize` of it.

  ``fn`` must block until its work is done (``jax.block_until_ready`` on its outputs), or the trace ends
  before the kernels do.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if steps < 1:
    raise ValueError(f"profile steps must be >= 1, got {steps}")
  os.makedirs(logdir, exist_ok=True)
  t0 = time.perf_counter()
  with jax.profiler.trace(logdir, create_perfetto_trace=True):
    for _ in range(steps):
      fn()
  wall_ms = (time.perf_counter() - t0) * 1e3
  summary = summarize(find_trace(logdir), top=top, steps=steps)
  summary["wall_ms_per_step"] = wall_ms / steps
  if summary["device_ms_per_step"]:
    summary["busy_share"] = summary["device_ms_per_step"] / summary["wall_ms_per_step"]
  summary["logdir"] = logdir
  return summary


def find_trace(logdir: str) -> str:
  """The newest Perfetto/Chrome trace (``*.trace.json.gz``) a ``jax.profiler.trace`` wrote under ``logdir``."""
  paths = [p for p in glob.glob(os.path.join(logdir, "**", "*.json.gz"), recursive=True)
           if p.endswith(".trace.json.gz") or os.path.basename(p) == "perfetto_trace.json.gz"]
  if not paths:
    raise FileNotFoundError(f"no *.trace.json.gz under {logdir}: did the profiler run (jax.profiler.trace)?")
  # Prefer XProf's own trace (vm.trace.json.gz) over the Perfetto copy; both hold the same events.
  paths.sort(key=lambda p: (os.path.getmtime(p), not p.endswith("perfetto_trace.json.gz")))
  return paths[-1]


def summarize(trace_path: str, *, top: int = 15, steps: int = 1) -> Dict:
  """Device kernel time of a trace, per name and per category, divided by ``steps``.

  Device timelines are the processes named ``/device:...`` (GPU/TPU); when there are none (a CPU run) the
  XLA executor threads (``tf_XLA...``) of ``/host:CPU`` stand in. Returns ``{"source", "device_ms_per_step",
  "top": [{"name", "category", "ms_per_step", "share", "calls_per_step"}], "categories": {name: share}}``.
  """
  opener = gzip.open if trace_path.endswith(".gz") else open
  with opener(trace_path, "rt") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  processes, threads = {}, {}
  for e in events:
    if e.get("ph") != "M":
      continue
    if e.get("name") == "process_name":
      processes[e["pid"]] = str(e.get("args", {}).get("name", ""))
    elif e.get("name") == "thread_name":
      threads[(e["pid"], e.get("tid"))] = str(e.get("args", {}).get("name", ""))
  device_pids = {pid for pid, name in processes.items() if name.startswith("/device:")}
  if device_pids:
    source = ", ".join(sorted(processes[p] for p in device_pids))
    keep = lambda e: e.get("pid") in device_pids  # noqa: E731
  else:
    source = "/host:CPU (XLA executor threads)"
    keep = lambda e: threads.get((e.get("pid"), e.get("tid")), "").startswith("tf_XLA")  # noqa: E731
  durations: Dict[str, float] = collections.defaultdict(float)
  calls: Dict[str, int] = collections.Counter()
  work = [e for e in events if e.get("ph") == "X" and keep(e) and not WAIT.search(str(e.get("name", "")))]
  for name, ms in _self_times(work):
    durations[base_name(name)] += ms
    calls[base_name(name)] += 1
  total = sum(durations.values())
  ranked = sorted(durations.items(), key=lambda kv: -kv[1])
  categories: Dict[str, float] = collections.defaultdict(float)
  for name, ms in ranked:
    categories[categorize(name)] += ms
  rows: List[Dict] = [
      {"name": name, "category": categorize(name), "ms_per_step": ms / steps,
       "share": ms / total if total else 0.0, "calls_per_step": calls[name] / steps}
      for name, ms in ranked[:top]]
  return {"source": source, "trace": trace_path, "steps": steps, "device_ms_per_step": total / steps,
          "kernels": len(durations), "top": rows,
          "categories": {k: v / total for k, v in sorted(categories.items(), key=lambda kv: -kv[1])}
          if total else {}}


def _self_times(events):
  """``(name, exclusive ms)`` of complete events: an event's time minus that of the events nested in it on the
  same thread (CPU executors nest ops inside ``ThunkExecutor::Execute``; GPU kernels do not nest)."""
  by_thread = collections.defaultdict(list)
  for e in events:
    by_thread[(e.get("pid"), e.get("tid"))].append((float(e.get("ts", 0.0)), float(e.get("dur", 0.0)),
                                                    str(e.get("name", "?"))))
  out = []
  for spans in by_thread.values():
    spans.sort(key=lambda x: (x[0], -x[1]))
    stack = []   # [end, name, self_us]
    for start, dur, name in spans:
      while stack and start >= stack[-1][0]:
        end, done_name, self_us = stack.pop()
        out.append((done_name, self_us / 1e3))
      if stack:
        stack[-1][2] -= min(dur, stack[-1][0] - start)
      stack.append([start + dur, name, dur])
    out.extend((name, self_us / 1e3) for _, name, self_us in stack)
  return out


def format_summary(summary: Dict, width: int = 70) -> str:
  """A plain-text table of :func:`summarize`'s result."""
  lines = [f"profile of {summary['steps']} step(s) on {summary['source']}: "
           f"{summary['device_ms_per_step']:.2f} ms of kernels per step, {summary['kernels']} distinct kernels"]
  if "busy_share" in summary:
    lines[0] += f", busy {100 * summary['busy_share']:.0f}% of {summary['wall_ms_per_step']:.2f} ms wall"
  lines.append("by category: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in summary["categories"].items()))
  lines.append(f"{'ms/step':>9} {'share':>6} {'calls':>6}  {'category':<11} kernel")
  for row in summary["top"]:
    name = row["name"] if len(row["name"]) <= width else row["name"][:width - 3] + "..."
    lines.append(f"{row['ms_per_step']:9.3f} {100 * row['share']:5.1f}% {row['calls_per_step']:6.1f}  "
                 f"{row['category']:<11} {name}")
  return "\n".join(lines)


def top_costs_markdown(summary: Optional[Dict], n: int = 8) -> str:
  """The top ``n`` kernels as a Markdown table (for docs/performance.md)."""
  if not summary:
    return "(no profile)"
  out = ["| kernel | category | ms per step | share |", "|---|---|---|---|"]
  for row in summary["top"][:n]:
    out.append(f"| `{row['name'][:90]}` | {row['category']} | {row['ms_per_step']:.2f} | "
               f"{100 * row['share']:.1f}% |")
  return "\n".join(out)
