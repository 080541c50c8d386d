"""``sc_dpo_jax.profiling``: kernel time read from a trace (synthetic traces with known answers, and a real
``jax.profiler`` trace of a jitted function on this CPU)."""
import gzip
import json

import jax
import jax.numpy as jnp
import pytest

from sc_dpo_jax import profiling


def _write(path, events):
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)
  return str(path)


def _meta(pid, tid, process, thread):
  return [{"ph": "M", "name": "process_name", "pid": pid, "args": {"name": process}},
          {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": thread}}]


def test_device_kernels_ranked_with_shares_and_categories(tmp_path):
  def x(name, ts, dur, pid=2, tid=7):
    return {"ph": "X", "name": name, "pid": pid, "tid": tid, "ts": ts, "dur": dur}

  events = _meta(1, 1, "/host:CPU", "python") + _meta(2, 7, "/device:GPU:0", "Stream #7") + [
      x("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", 0, 600),          # matmul
      x("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", 700, 600),
      x("cudnn_generated_fort_native_sdpa_sm90_knob_3", 1400, 500),   # attention
      x("loop_add_fusion.12", 2000, 100), x("loop_add_fusion.13", 2200, 100),   # one name once numbered
      x("sm90_xmma_fprop_implicit_gemm_bf16", 2400, 100),             # convolution
      x("PjitFunction(step)", 0, 5000, pid=1, tid=1),                 # host: not device time
  ]
  summary = profiling.summarize(_write(tmp_path / "t.trace.json.gz", events), steps=2)
  assert summary["source"] == "/device:GPU:0"
  assert summary["device_ms_per_step"] == pytest.approx(2.0 / 2)     # 2000 us of kernels over 2 steps
  top = {row["name"]: row for row in summary["top"]}
  # Instance numbers go (XLA numbers its kernels ".N" or "_N"; cuDNN its knobs)
  assert list(top) == ["sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", "cudnn_generated_fort_native_sdpa_sm90_knob",
                       "loop_add_fusion", "sm90_xmma_fprop_implicit_gemm_bf16"]
  assert top["sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n"]["share"] == pytest.approx(0.6)
  assert top["sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n"]["calls_per_step"] == 1.0
  assert top["loop_add_fusion"]["ms_per_step"] == pytest.approx(0.1)
  assert summary["categories"] == pytest.approx({"matmul": 0.6, "attention": 0.25, "fusion": 0.1,
                                                 "convolution": 0.05})
  text = profiling.format_summary(summary)
  assert "matmul 60.0%" in text and "attention 25.0%" in text


def test_cpu_executor_events_count_their_own_time_only(tmp_path):
  # A CPU trace nests ops inside an executor event; waiting is not work.
  x = lambda name, ts, dur, tid=3: {"ph": "X", "name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur}  # noqa: E731
  events = _meta(1, 3, "/host:CPU", "tf_XLAPjRtCpuClient/1") + _meta(1, 4, "/host:CPU", "python") + [
      x("ThunkExecutor::Execute", 0, 1000), x("dot.3", 100, 300), x("ynn_fusion.1", 500, 200),
      x("ThunkExecutor::Execute (wait for completion)", 1000, 5000),
      x("PjitFunction(f)", 0, 9000, tid=4)]
  summary = profiling.summarize(_write(tmp_path / "t.trace.json.gz", events))
  assert summary["source"].startswith("/host:CPU")
  got = {row["name"]: row["ms_per_step"] for row in summary["top"]}
  assert got == pytest.approx({"ThunkExecutor::Execute": 0.5, "dot": 0.3, "ynn_fusion": 0.2})


def test_profile_of_a_real_jitted_function(tmp_path):
  f = jax.jit(lambda a: jnp.tanh(a @ a).sum())
  a = jnp.ones((256, 256))
  f(a).block_until_ready()
  summary = profiling.profile(lambda: f(a).block_until_ready(), steps=3, logdir=str(tmp_path / "trace"))
  assert summary["steps"] == 3 and summary["top"] and summary["device_ms_per_step"] > 0
  assert 0 < summary["busy_share"] and summary["wall_ms_per_step"] > 0
  assert sum(row["share"] for row in summary["top"]) <= 1 + 1e-9
  assert (tmp_path / "trace").exists() and profiling.find_trace(str(tmp_path / "trace")).endswith(".json.gz")


def test_missing_trace_names_the_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    profiling.find_trace(str(tmp_path))


def test_base_name_and_categories():
  assert profiling.base_name("loop_add_fusion.12") == "loop_add_fusion"
  assert profiling.base_name("input_reduce_fusion_3") == "input_reduce_fusion"
  assert profiling.base_name("ampere_bf16_s16816gemm_bf16_128x64") == "ampere_bf16_s16816gemm_bf16_128x64"
  assert profiling.categorize("nvjet_tst_192x192_64x3_1x2_h_bz_coopB_TNT") == "matmul"
  assert profiling.categorize("ncclDevKernel_AllReduce_Sum_f32") == "collective"
  assert profiling.categorize("Memcpy DtoD (Device -> Device)") == "copy"
  assert profiling.categorize("something_else") == "other"
