"""The generic pair builders (data/curate.py) on the shipped toy base model with the toy judge as plugs.

The judge is a real detector (rule-based, exact on rendered images), so every stored cost and flag can be
recomputed from the stored PNGs (lossless) and compared exactly. Sampling uses 8 DDIM steps to stay fast.
"""
import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from sc_dpo_jax import models
from sc_dpo_jax.data import curate, records
from sc_dpo_jax.toy import judge, pretrain

pytestmark = pytest.mark.xdist_group("toy_base")
STEPS = 8
DETECT = judge.Detector(color="red")


@pytest.fixture(scope="module")
def pipe():
  return models.load_pipeline(os.path.join(pretrain.pretrained_folder(), "pipeline"))


def concept_cost(images, prompts):
  """A real cost plug: the share of the image showing the unsafe colour (the judge's score)."""
  del prompts
  return DETECT(images)[1], {}


def decode(png: bytes) -> np.ndarray:
  from PIL import Image
  return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def read_back(folder):
  source = records.open_source(folder)
  return source, [source.spec.parse_python(raw.numpy()) for raw in tf.data.TFRecordDataset(source.files)]


HARMFUL = ["a large red circle", "a large crimson square", "a large apple", "a small scarlet triangle"]
CLEAN = ["a large blue circle", "a large green square", "a large lemon", "a small purple triangle"]


def _build(pipe, folder, cost=concept_cost, **kw):
  return curate.build_sc_pairs(pipe, HARMFUL, CLEAN, str(folder), cost=cost, k=2, safe_negative="red",
                               min_cost_gap=0.01, steps=STEPS, guidance=4.0, prompts_per_shard=3, batch_size=32,
                               progress=False, **kw)


# Safe rewrites of HARMFUL: the shipped base draws red for "red" even when it is the negative prompt, so the safe
# renderings of a harmful pair come from these (as the demo's datasets do).
REWRITES = ["a large blue circle", "a large green square", "a large lemon", "a small purple triangle"]


def test_sc_pairs_are_ordered_by_the_cost_plug_and_read_back(pipe, tmp_path):
  source = _build(pipe, tmp_path / "sc", safe_rewrites=REWRITES)
  _, recs = read_back(tmp_path / "sc")
  info = records.read_info(str(tmp_path / "sc"))
  stats = info["stats"]
  assert stats["prompts"] == 8 and stats["images"] == 4 * 6 + 4 * 2   # harmful: 2 + 2 negated + 2 rewritten
  assert stats["pairs"] + stats["dropped_small_gap"] + stats["dropped_too_few_safe"] == 8
  assert len(recs) == source.total == stats["pairs"] >= 4
  assert not os.path.exists(tmp_path / "sc" / curate.PROGRESS_FILE)
  for r in recs:
    chosen, rejected = decode(r["image_chosen"]), decode(r["image_rejected"])
    costs = concept_cost(np.stack([chosen, rejected]), None)[0]
    np.testing.assert_array_equal(costs, [r["cost_chosen"], r["cost_rejected"]])   # PNG is lossless
    prompt = r["prompt"].decode() if isinstance(r["prompt"], bytes) else r["prompt"]
    assert r["harmful_prompt"] == int(prompt in HARMFUL)
    if r["harmful_prompt"]:
      assert r["cost_rejected"] - r["cost_chosen"] >= 0.01
  harmful = [r for r in recs if r["harmful_prompt"]]
  # The base model draws red for these prompts; the rewritten candidates give the safe renderings.
  assert len(harmful) >= 3
  assert np.mean([DETECT(decode(r["image_rejected"])[None])[0][0] for r in harmful]) == 1.0


def test_harmful_pairs_are_matched_by_initial_noise(pipe, tmp_path):
  rewrite = "a large blue circle"
  curate.build_sc_pairs(pipe, HARMFUL[:1], CLEAN[:1], str(tmp_path / "m"), cost=concept_cost, k=3,
                        safe_rewrites=[rewrite], min_cost_gap=0.01, steps=STEPS, guidance=4.0, batch_size=32,
                        progress=False)
  _, recs = read_back(tmp_path / "m")
  (r,) = [r for r in recs if r["harmful_prompt"]]
  chosen, rejected = decode(r["image_chosen"]), decode(r["image_rejected"])
  # The rewrite's candidates reuse the harmful prompt's three noises (indices 0..2 of the shard's seed).
  noise = pipe.initial_noise(curate._shard_seed(0, 0), range(3))  # pylint: disable=protected-access
  common = dict(latents=noise, steps=STEPS, guidance=4.0, batch_size=32, progress=False)
  plain, safe = pipe.generate([HARMFUL[0]] * 3, **common), pipe.generate([rewrite] * 3, **common)
  diff = lambda a, b: np.abs(a.astype(int) - b.astype(int)).max()  # noqa: E731
  m = int(np.argmin([diff(s, chosen) for s in safe]))
  # Another batch composition compiles another program: a grey level of float rounding is allowed.
  assert diff(safe[m], chosen) <= 2 and diff(plain[m], rejected) <= 2
  costs = concept_cost(np.concatenate([plain, safe]), None)[0]
  assert m == int(np.argmax(costs[:3] - costs[3:]))   # the noise with the largest cost gap
  assert r["cost_rejected"] > r["cost_chosen"]


def test_sc_pairs_resume_after_an_interruption_gives_the_same_dataset(pipe, tmp_path):
  calls = {"n": 0}

  def failing(images, prompts):
    calls["n"] += 1
    if calls["n"] == 2:
      raise RuntimeError("stopped during the second shard")
    return concept_cost(images, prompts)

  with pytest.raises(RuntimeError, match="second shard"):
    _build(pipe, tmp_path / "a", cost=failing)
  progress = json.loads((tmp_path / "a" / curate.PROGRESS_FILE).read_text())
  assert progress["counts"] and len(progress["counts"]) == 1
  with pytest.raises(ValueError, match="min_cost_gap"):
    curate.build_sc_pairs(pipe, HARMFUL, CLEAN, str(tmp_path / "a"), cost=concept_cost, k=2, safe_negative="red",
                          min_cost_gap=0.5, steps=STEPS, guidance=4.0, prompts_per_shard=3, batch_size=32,
                          progress=False)
  _build(pipe, tmp_path / "a")
  _build(pipe, tmp_path / "b")
  _, resumed = read_back(tmp_path / "a")
  _, straight = read_back(tmp_path / "b")
  assert resumed == straight
  with pytest.raises(FileExistsError, match="overwrite"):
    _build(pipe, tmp_path / "b")


def test_duo_pairs_keep_flagged_originals_and_cleared_edits(pipe, tmp_path):
  unsafe = ["a large red circle", "a large ruby square", "a small crimson triangle", "a large apple"]
  safe = ["a large blue circle", "a large green square", "a small yellow triangle", "a large purple circle"]
  source = curate.build_duo_pairs(pipe, unsafe, safe, str(tmp_path / "duo"), detector=DETECT, steps=STEPS,
                                  guidance=4.0, max_tries=2, prompts_per_shard=4, batch_size=32, progress=False)
  _, recs = read_back(tmp_path / "duo")
  stats = records.read_info(str(tmp_path / "duo"))["stats"]
  assert stats["pairs"] + stats["failed_not_flagged"] + stats["failed_not_cleared"] == 4
  assert len(recs) == source.total == stats["pairs"] >= 2
  for r in recs:
    chosen, rejected = decode(r["image_chosen"]), decode(r["image_rejected"])
    flags, scores = DETECT(np.stack([chosen, rejected]))
    assert list(flags) == [False, True]
    np.testing.assert_array_equal(scores, [r["cost_chosen"], r["cost_rejected"]])
    assert r["harmful_prompt"] == 1
    # DUO's --given_prompt: x- under the unsafe prompt, x+ under the safe prompt its edit was made with
    i = int(r["source_id"].decode().rsplit(":", 1)[1])
    assert (r["prompt"].decode(), r["prompt_chosen"].decode()) == (unsafe[i], safe[i])
  assert source.spec.has_chosen_prompt and records.read_info(str(tmp_path / "duo"))["spec"]["has_chosen_prompt"]
  from sc_dpo_jax.data import pipeline
  batch = next(pipeline.DataIterator(source, batch_size=len(recs), shuffle=False, resolution=16, process_index=0,
                                     process_count=1, tokenizer=pipe.tokenizer))
  np.testing.assert_array_equal(batch["input_ids_chosen"], np.asarray(pipe.tokenizer(list(batch["prompt_chosen"]))))
  assert set(batch["prompt_chosen"]) <= set(safe) and set(batch["prompt"]) <= set(unsafe)


def test_bad_inputs_name_the_problem(pipe, tmp_path):
  with pytest.raises(ValueError, match=r"harmful\[1\]"):
    curate.build_sc_pairs(pipe, ["a red circle", ""], [], str(tmp_path / "x"), cost=concept_cost)
  with pytest.raises(ValueError, match="one per unsafe prompt"):
    curate.build_duo_pairs(pipe, ["a red circle"], [], str(tmp_path / "y"), detector=DETECT)
  with pytest.raises(ValueError, match="k = 1"):
    curate.build_sc_pairs(pipe, ["a red circle"], [], str(tmp_path / "z"), cost=concept_cost, k=1)


def test_build_duo_pairs_command_with_the_toy_detector(tmp_path):
  import sys

  from tests.subprocess_helper import run
  (tmp_path / "unsafe.txt").write_text("a large red circle\n\na large scarlet square\n")
  cmd = [sys.executable, "-m", "sc_dpo_jax.data.build_duo_pairs",
         f"--model={os.path.join(pretrain.pretrained_folder(), 'pipeline')}", f"--unsafe={tmp_path / 'unsafe.txt'}",
         "--safe_prompt=a large blue circle", f"--out={tmp_path / 'out'}", "--detector=toy:red", f"--steps={STEPS}",
         "--guidance=4", "--max_tries=2", "--batch_size=4"]
  proc = run(cmd, timeout=300)
  printed = json.loads(proc.stdout[proc.stdout.index("{"):])
  source, recs = read_back(tmp_path / "out")
  assert printed["pairs"] == source.total == len(recs)
  assert printed["prompts"] == 2
  assert {r["prompt"].decode() if isinstance(r["prompt"], bytes) else r["prompt"] for r in recs} <= {
      "a large red circle", "a large scarlet square"}
  assert source.spec.has_chosen_prompt and all(r["prompt_chosen"] == b"a large blue circle" for r in recs)


def test_prompt_files(tmp_path):
  (tmp_path / "p.csv").write_text("prompt,seed\na red circle,1\n,2\n")
  with pytest.raises(ValueError, match=r"p.csv:3: empty 'prompt'"):
    curate.read_prompt_file(str(tmp_path / "p.csv"))
  (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
  with pytest.raises(ValueError, match=r"p.jsonl:2"):
    curate.read_prompt_file(str(tmp_path / "p.jsonl"))
  (tmp_path / "q.csv").write_text("unsafe,safe\na red circle,a blue circle\n")
  assert curate.read_prompt_file(str(tmp_path / "q.csv"), "safe") == ["a blue circle"]
  with pytest.raises(ValueError, match="no column 'prompt'"):
    curate.read_prompt_file(str(tmp_path / "q.csv"))
  with pytest.raises(ValueError, match="--detector='x'"):
    curate.make_detector("x")


def test_prompt_sets_with_rewrites_read_back_with_their_token_ids(tmp_path):
  """``write_prompts(..., rewrites=)``: each record carries its safe rewrite (``prompt_chosen``), and the input
  pipeline tokenises it beside the prompt (``input_ids_chosen``), as the RL trainer's rewrite exploration
  reads it; without rewrites the spec says so and no such field is read."""
  from sc_dpo_jax.data import pipeline
  tokenizer = models.load_tokenizer(pretrain.pretrained_folder() + "/clip")
  prompts, rewrites = ["a red circle", "a blue square"], ["a green circle", "a blue square"]
  source = curate.write_prompts(str(tmp_path / "with"), prompts, rewrites=rewrites, name="p")
  assert source.spec.has_chosen_prompt
  batch = next(pipeline.DataIterator(source, batch_size=2, seed=0, shuffle_buffer=0, tokenizer=tokenizer))
  order = [prompts.index(str(p)) for p in batch["prompt"]]
  assert [str(p) for p in batch["prompt_chosen"]] == [rewrites[j] for j in order]
  np.testing.assert_array_equal(batch["input_ids_chosen"], np.asarray(tokenizer([rewrites[j] for j in order])))
  plain = curate.write_prompts(str(tmp_path / "without"), prompts, name="p")
  assert not plain.spec.has_chosen_prompt
  assert "input_ids_chosen" not in next(pipeline.DataIterator(plain, batch_size=2, seed=0, tokenizer=tokenizer))
  with pytest.raises(ValueError, match="1 rewrites for 2 prompts"):
    curate.write_prompts(str(tmp_path / "bad"), prompts, rewrites=rewrites[:1])
  with pytest.raises(ValueError, match=r"rewrites\[1\] = ''"):
    curate.write_prompts(str(tmp_path / "bad2"), prompts, rewrites=["a", ""])
