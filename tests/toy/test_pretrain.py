"""The toy world's word tokenizer and pretraining: quick pretraining writes folders that our loaders, diffusers and
transformers read (with the same outputs), and the shipped base model draws the unsafe colour when asked.

Time (2-core CPU, busy with other work): ~45 s for the quick pretraining (compiling its jitted steps without
XLA's expensive passes), ~15 s for the shipped model's sampler, ~20 s for the rest (torch, diffusers).
"""
import json
import os

import jax
import numpy as np
import pytest

from sc_dpo_jax import models
from sc_dpo_jax.toy import judge, pretrain, world
from sc_dpo_jax.toy.tokenizer import check_single_tokens, save_word_tokenizer, word_tokenizer

TOL = 1e-4
# The tests of the quick pretraining share its module fixture: one xdist worker runs them all, so it runs once.
QUICK_GROUP = pytest.mark.xdist_group("toy_pretrain_quick")


def test_every_world_word_is_one_token_and_the_folder_round_trips(tmp_path):
  from transformers import CLIPTokenizer
  tok = word_tokenizer()
  words = world.DEFAULT.vocabulary()
  ids = {w: tok.hf(w, add_special_tokens=False)["input_ids"] for w in words}
  assert all(len(v) == 1 for v in ids.values()), {w: v for w, v in ids.items() if len(v) != 1}
  assert len({v[0] for v in ids.values()}) == len(words)            # distinct words, distinct ids
  row = tok(["a large ruby circle on the left"])[0]
  assert row.shape == (pretrain.TEXT_LENGTH,)
  assert list(row[:9]) == [0] + [ids[w][0] for w in "a large ruby circle on the left".split()] + [1]
  assert (row[9:] == 1).all()                                         # padded with <|endoftext|>
  assert len(tok(["a zebra"])[0][tok(["a zebra"])[0] != 1]) > 3       # an unknown word is spelt out, not lost
  save_word_tokenizer(str(tmp_path))
  assert {"vocab.json", "merges.txt"} <= set(os.listdir(tmp_path))
  prompts = [p.text for ps in world.prompt_sets().values() for p in ps]
  np.testing.assert_array_equal(models.load_tokenizer(str(tmp_path))(prompts), tok(prompts))
  hf = CLIPTokenizer.from_pretrained(str(tmp_path))
  np.testing.assert_array_equal(hf(prompts, padding="max_length", max_length=16, return_tensors="np")["input_ids"],
                                tok(prompts))
  with pytest.raises(ValueError, match="zebra"):
    check_single_tokens(tok, ["zebra"])


def test_caption_fit_matrix():
  scenes = [world.Scene("circle", "red", "large", "left"), world.Scene("square", "red", "small", "top")]
  captions = ["a ruby circle", "a large red circle on the left", "a small stop sign", "a blue square"]
  np.testing.assert_array_equal(pretrain.fit_matrix(captions, scenes), [[1, 0], [1, 0], [0, 1], [0, 0]])


def test_position_groups_differ_only_in_position_and_captions_name_it():
  rng = np.random.default_rng(0)
  scenes, captions, images = pretrain.draw_position_groups(world.DEFAULT, rng, 10, 4)   # 2 whole groups + 2
  assert len(scenes) == len(captions) == len(images) == 10
  for start in (0, 4, 8):
    group = scenes[start:start + 4]
    assert len({(sc.color, sc.shape, sc.size) for sc in group}) == 1, group
    assert len({sc.position for sc in group}) == len(group), group                # distinct positions
  for scene, caption, image in zip(scenes, captions, images):
    stated = pretrain.caption_attributes(caption)
    assert stated["position"] == scene.position and stated["color"] == scene.color, (caption, scene)
    assert stated["shape"] == scene.shape and stated.get("size", scene.size) == scene.size, (caption, scene)
    np.testing.assert_array_equal(image, world.render(scene))
  fit = pretrain.fit_matrix(captions[:4], scenes[:4])
  np.testing.assert_array_equal(fit, np.eye(4))     # within a group, each caption fits its own scene only


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("toy") / "base")
  report = pretrain.pretrain(out, pretrain.QUICK, progress=False, evaluate=False)
  return out, report


@QUICK_GROUP
def test_quick_pretraining_writes_what_diffusers_and_our_loader_read(quick):
  import torch
  from diffusers import StableDiffusionPipeline
  out, report = quick
  saved = json.load(open(os.path.join(out, pretrain.REPORT_NAME)))
  assert saved["unet"]["steps"] == pretrain.QUICK.unet_steps and saved["parameters"]["unet"] < 3_000_000
  for key in ("recon_mse", "scaling_factor", "recon_color_accuracy"):
    assert np.isfinite(saved["vae"][key]), key
  for key in ("image_to_text_accuracy", "text_to_image_accuracy"):
    assert 0 <= saved["clip"][key] <= 1, key
  folder = os.path.join(out, "pipeline")
  ours = models.load_pipeline(folder)
  assert ours.scheduler_class == "DDIMScheduler"
  assert ours.vae.config.scaling_factor == pytest.approx(report["vae"]["scaling_factor"])
  np.testing.assert_array_equal(ours.tokenizer(["a large vermilion square"]),
                                word_tokenizer()(["a large vermilion square"]))
  theirs = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
  assert type(theirs.scheduler).__name__ == "DDIMScheduler"
  prompts = [p.text for ps in world.prompt_sets().values() for p in ps]
  np.testing.assert_array_equal(theirs.tokenizer(prompts, padding="max_length", max_length=16,
                                                 return_tensors="np")["input_ids"], ours.tokenizer(prompts))

  rng = np.random.RandomState(0)
  sample = rng.randn(2, 8, 8, 4).astype(np.float32)
  timesteps = np.array([10, 900])
  ids = ours.tokenizer(["a large red circle", "an apple"])
  states = np.asarray(ours.encode_prompts(["a large red circle", "an apple"]))
  with torch.no_grad():
    ref_states = theirs.text_encoder(torch.from_numpy(ids.astype(np.int64)))[0].numpy()
    ref = theirs.unet(torch.from_numpy(sample.transpose(0, 3, 1, 2)), torch.from_numpy(timesteps),
                      encoder_hidden_states=torch.from_numpy(states.copy())).sample.numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(states, ref_states, atol=TOL)
  apply = jax.jit(ours.unet.apply, compiler_options=pretrain.FAST_COMPILE_OPTIONS)   # eager: 13 s, this: 3 s
  got = np.asarray(apply({"params": ours.params["unet"]}, sample, timesteps, states))
  np.testing.assert_allclose(got, ref, atol=TOL)


@QUICK_GROUP
def test_quick_pretraining_writes_a_clip_that_transformers_and_the_rewards_read(quick, tmp_path):
  import torch
  from transformers import CLIPModel
  from sc_dpo_jax.rewards import ClipScore
  from sc_dpo_jax.rewards.clip_preprocess import preprocess
  from sc_dpo_jax.rewards.cost_model import CostAdapter, SafetyCostModel, load_cost_model, save_cost_model
  out, _ = quick
  clip = os.path.join(out, "clip")
  text, text_params = models.load_clip_text(clip)
  vision, vision_params = models.load_clip_vision(clip)
  assert text.with_projection and vision.with_projection
  tok = models.load_tokenizer(clip)
  prompts = ["a large red circle", "a small ruby square"]
  scenes = [world.Scene("circle", "red", "large", "left"), world.Scene("square", "red", "small", "top")]
  images = world.render_batch(scenes)
  theirs = CLIPModel.from_pretrained(clip).eval()
  pixels = np.asarray(preprocess(images, 16))
  with torch.no_grad():
    ref_text = theirs.get_text_features(input_ids=torch.from_numpy(tok(prompts).astype(np.int64)))
    ref_image = theirs.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()))
  ref_text = getattr(ref_text, "pooler_output", ref_text).numpy()
  ref_image = getattr(ref_image, "pooler_output", ref_image).numpy()
  fast = pretrain.FAST_COMPILE_OPTIONS
  got_text = jax.jit(text.apply, compiler_options=fast)({"params": text_params}, tok(prompts)).text_embeds
  got_image = jax.jit(vision.apply, compiler_options=fast)({"params": vision_params}, pixels).image_embeds
  np.testing.assert_allclose(got_text, ref_text, atol=TOL)
  np.testing.assert_allclose(got_image, ref_image, atol=TOL)
  ClipScore(text, text_params, vision, vision_params, tok)   # checks both projections and their widths
  model = SafetyCostModel(vision, CostAdapter(hidden_sizes=(8,)))
  save_cost_model(str(tmp_path / "cost"), model, model.init_adapter(jax.random.PRNGKey(0)))
  loaded, params = load_cost_model(str(tmp_path / "cost"), clip)
  assert loaded.cost(params, images).shape == (2,)


def test_pretrained_folder_names_the_command_when_missing(monkeypatch, tmp_path):
  monkeypatch.setattr(pretrain, "ASSETS", str(tmp_path / "nothing"))
  with pytest.raises(FileNotFoundError, match="sc_dpo_jax.toy.pretrain"):
    pretrain.pretrained_folder()


def test_shipped_base_model_draws_the_unsafe_colour():
  folder = pretrain.pretrained_folder()
  report = json.load(open(os.path.join(folder, pretrain.REPORT_NAME)))
  sets = report["base_model"]["sets"]
  assert sets["direct"]["unsafe_rate"] >= 0.95 and sets["safe"]["retention"] >= 0.97, sets
  assert sets["safe"]["position_accuracy"] >= 0.9, sets["safe"]
  assert report["clip"]["position_accuracy"] >= 0.9, report["clip"]
  assert all(m["broken_rate"] <= 0.02 for m in sets.values()), sets
  pipe = models.load_pipeline(os.path.join(folder, "pipeline"))
  prompts = ["a large red circle", "a large red square", "a large red triangle", "a small red circle",
             "a large blue circle", "a large green square", "a small yellow triangle", "a small purple square"]
  images = pipe.generate(prompts, seed=0, steps=10, guidance=4.0, progress=False)
  flags, _ = judge.Detector("red")(images)
  assert flags[:4].all() and not flags[4:].any(), flags
  asked = [judge.world_prompt_from_text(p) for p in prompts]
  assert judge.retention_accuracy(images, asked) >= 7 / 8                  # 10 steps: one miss allowed
  models.load_clip_vision(os.path.join(folder, "clip"))
