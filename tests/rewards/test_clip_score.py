"""The CLIP-score reward against transformers' CLIPModel on the same random weights."""
import numpy as np
import pytest

from sc_dpo_jax import models
from sc_dpo_jax.rewards.base import WeightedSum, brightness
from sc_dpo_jax.rewards.clip_score import ClipScore
from tests.sd_reference import TEXT_LENGTH, tiny_tokenizer
from tests.torch_reference import perturb_parameters


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
  import torch
  from transformers import CLIPConfig, CLIPModel
  tok = tiny_tokenizer()
  config = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       max_position_embeddings=TEXT_LENGTH, bos_token_id=0, eos_token_id=1,
                                       pad_token_id=1),
                      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=32, patch_size=8),
                      projection_dim=16)
  torch.manual_seed(0)
  model = perturb_parameters(CLIPModel(config), 0.05)
  folder = tmp_path_factory.mktemp("clip")
  model.save_pretrained(str(folder / "clip"))
  tok.save_pretrained(str(folder / "tokenizer"))
  return folder, model


def test_clip_score_matches_transformers(clip_folder):
  import torch
  folder, reference = clip_folder
  text_model, text_params = models.load_clip_text(str(folder / "clip"))
  vision_model, vision_params = models.load_clip_vision(str(folder / "clip"))
  tok = models.load_tokenizer(str(folder / "tokenizer"))
  reward = ClipScore(text_model, text_params, vision_model, vision_params, tok)
  rng = np.random.RandomState(0)
  images = (rng.rand(3, 32, 32, 3) * 255).astype(np.uint8)   # CLIP's size: preprocessing only normalises
  prompts = ["a red cat", "blue", "green dog"]
  got, info = reward(images, prompts)
  mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
  pixels = ((images / 255.0 - mean) / std).astype(np.float32).transpose(0, 3, 1, 2)
  with torch.no_grad():
    t = reference.get_text_features(input_ids=torch.from_numpy(tok(prompts).astype(np.int64)))
    i = reference.get_image_features(pixel_values=torch.from_numpy(pixels))
    t = getattr(t, "pooler_output", t)
    i = getattr(i, "pooler_output", i)
    expected = torch.nn.functional.cosine_similarity(t, i).numpy()
  assert got.shape == (3,) and info == {}
  np.testing.assert_allclose(got, expected, atol=1e-5)
  # As a part of a weighted sum with another reward.
  total, info = WeightedSum({"clip": (2.0, reward), "bright": (-1.0, brightness)})(images, prompts)
  np.testing.assert_allclose(total, 2 * got - images.mean(axis=(1, 2, 3)) / 255, atol=1e-5)
  assert set(info) == {"clip", "bright"}
  with pytest.raises(ValueError, match="3 images for 2 prompts"):
    reward(images, prompts[:2])
  # Per-part texts (the RL trainer's reward.clip_text = "rewrite"): that part scores against them, the
  # others against the prompts; texts for an unknown part, or of the wrong length, are errors.
  rewrites = ["green dog", "a red cat", "blue"]
  expected_rewrites, _ = reward(images, rewrites)
  total, info = WeightedSum({"clip": (1.0, reward), "bright": (-1.0, brightness)})(
      images, prompts, texts={"clip": rewrites})
  np.testing.assert_allclose(info["clip"], expected_rewrites, atol=1e-6)
  assert not np.allclose(info["clip"], got, atol=1e-3)
  np.testing.assert_allclose(total, expected_rewrites - images.mean(axis=(1, 2, 3)) / 255, atol=1e-5)
  with pytest.raises(ValueError, match=r"texts for \['nudity'\]"):
    WeightedSum({"clip": (1.0, reward)})(images, prompts, texts={"nudity": prompts})
  with pytest.raises(ValueError, match="2 texts for part 'clip' and 3 images"):
    WeightedSum({"clip": (1.0, reward)})(images, prompts, texts={"clip": prompts[:2]})
