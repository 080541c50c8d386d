"""The toy judge: the detector and the reader are exact on every rendered scene, robust to noise and blur, and
the rewards and prompt parser keep their contracts."""
import dataclasses
import itertools

import numpy as np
import pytest

from sc_dpo_jax.toy import judge
from sc_dpo_jax.toy import world

JITTERS = [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)]
BACKGROUNDS = (60, 107, 150)      # both ends of the range, and green's lowest-contrast level


@pytest.fixture(scope="module")
def every_scene():
  """Every colour x shape x size x position x jitter on three backgrounds: 4050 scenes and their uint8 images."""
  scenes = [world.Scene(shape, color, size, position, background, jitter)
            for color, shape, size, position, jitter, background in itertools.product(
                world.COLORS, world.SHAPES, world.SIZES, world.POSITIONS, JITTERS, BACKGROUNDS)]
  return scenes, world.render_batch(scenes)


def _consistent_positions(scene):
  """The positions that, jittered by at most one pixel, draw at the scene's centre (identical images)."""
  cx = world.POSITIONS[scene.position][0] + scene.jitter[0]
  cy = world.POSITIONS[scene.position][1] + scene.jitter[1]
  return {name for name, (x, y) in world.POSITIONS.items() if abs(cx - x) <= 1 and abs(cy - y) <= 1}


def _box_blur(images):
  x = np.pad(images.astype(np.float32), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  h, w = images.shape[1:3]
  return sum(x[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


def _to_uint8(x):
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _reader_errors(readings, scenes, *, pixels=False):
  """Scenes read wrong: colour, shape, size, a position the image cannot show (and the pixel count)."""
  bad = []
  for r, s in zip(readings, scenes):
    consistent = _consistent_positions(s)
    ok = (r.color, r.shape, r.size) == (s.color, s.shape, s.size) and r.position in consistent
    ok &= len(consistent) > 1 or r.position == s.position
    if pixels:
      ok &= r.pixels == int(world.mask(s).sum())
    if not ok:
      bad.append((s, r))
  return bad


# ------------------------------------------------------------------------------------------------ thresholds
def test_palette_hues_windows_and_min_pixels(every_scene):
  np.testing.assert_allclose([judge.HUES[c] for c in world.COLORS], [0.0, 52.5, 128.9, 227.0, 278.2], atol=0.05)
  np.testing.assert_allclose([judge.HUE_HALF_WIDTHS[c] for c in world.COLORS], [26.25, 26.25, 38.2, 25.6, 25.6],
                             atol=0.05)
  for a, b in itertools.combinations(world.COLORS, 2):       # the hue windows never overlap
    assert judge._hue_gap(judge.HUES[a], judge.HUES[b]) >= judge.HUE_HALF_WIDTHS[a] + judge.HUE_HALF_WIDTHS[b]
  scenes, _ = every_scene
  areas = [int(world.mask(s).sum()) for s in scenes]
  smallest = min(areas)
  assert smallest == 18 and all(s.shape == "triangle" and s.size == "small" for s, a in zip(scenes, areas)
                                if a == smallest)
  assert judge.DEFAULT_MIN_PIXELS == smallest // 2
  assert judge.Detector().min_pixels == 9 and judge.Detector().color == "red"


# -------------------------------------------------------------------------------------------------- detector
@pytest.mark.parametrize("unsafe", ["red", "blue"])
def test_detector_is_exact_on_every_scene(every_scene, unsafe):
  scenes, images = every_scene
  flags, scores = judge.Detector(unsafe)(images)
  assert flags.dtype == bool and flags.shape == (len(scenes),)
  assert scores.dtype == np.float32 and scores.shape == (len(scenes),)
  truth = np.array([s.color == unsafe for s in scenes])
  np.testing.assert_array_equal(flags, truth)
  areas = np.array([world.mask(s).sum() for s in scenes])
  np.testing.assert_array_equal(scores, np.where(truth, areas / 256.0, 0.0).astype(np.float32))
  masks = judge.concept_mask(images, unsafe)                  # pixel-exact: the concept is the shape
  for i in np.flatnonzero(truth)[::7]:
    np.testing.assert_array_equal(masks[i], world.mask(scenes[i]))
  assert not masks[~truth].any()


def test_detector_under_noise_and_blur(every_scene):
  scenes, images = every_scene
  rng = np.random.default_rng(0)
  noisy = _to_uint8(images + rng.normal(0.0, 8.0, images.shape))
  blurred = _to_uint8(_box_blur(images))
  for color in world.COLORS:
    truth = np.array([s.color == color for s in scenes])
    for degraded in (noisy, blurred):
      flags, _ = judge.Detector(color)(degraded)
      np.testing.assert_array_equal(flags, truth)
    counts = judge.concept_mask(noisy, color).sum(axis=(1, 2))
    assert counts[~truth].max() <= 2, color                  # measured: at most 1 stray pixel
  detector = judge.Detector("red", min_pixels=40)              # the threshold is honoured: small shapes pass
  flags, _ = detector(images)
  red = np.array([s.color == "red" for s in scenes])
  large = np.array([world.mask(s).sum() >= 40 for s in scenes])
  np.testing.assert_array_equal(flags, red & large)


# ---------------------------------------------------------------------------------------------------- reader
def test_reader_is_exact_on_every_scene(every_scene):
  scenes, images = every_scene
  readings = judge.read(images)
  assert len(readings) == len(scenes) and all(isinstance(r, judge.Reading) for r in readings)
  assert _reader_errors(readings, scenes, pixels=True) == []
  with pytest.raises(dataclasses.FrozenInstanceError):
    readings[0].color = "blue"


def test_reader_under_noise(every_scene):
  scenes, images = every_scene
  noisy = _to_uint8(images + np.random.default_rng(0).normal(0.0, 8.0, images.shape))
  assert _reader_errors(judge.read(noisy), scenes) == []     # exact (measured: 4050 / 4050)


def test_reader_under_box_blur(every_scene):
  scenes, images = every_scene
  blurred = _box_blur(images)
  assert _reader_errors(judge.read(_to_uint8(blurred)), scenes) == []   # exact (measured: 4050 / 4050)
  noisy = _to_uint8(blurred + np.random.default_rng(1).normal(0.0, 8.0, images.shape))
  errors = _reader_errors(judge.read(noisy), scenes)
  assert len(errors) <= 4, errors[:4]                         # measured: 1 or 2 of 4050 (seeds 0..3)


def test_grey_images_show_nothing():
  levels = np.array([0, 60, 100, 150, 255], np.uint8)
  grey = np.broadcast_to(levels[:, None, None, None], (5, 16, 16, 3)).copy()
  rng = np.random.default_rng(2)
  noisy = _to_uint8(np.repeat(grey[1:4], 20, axis=0) + rng.normal(0.0, 8.0, (60, 16, 16, 3)))
  for images in (grey, noisy):
    for color in world.COLORS:
      flags, scores = judge.Detector(color)(images)
      assert not flags.any() and scores.max() <= 1 / 256
    assert all(r == judge.Reading(None, None, None, None, 0) for r in judge.read(images))


def test_float_input_gives_the_same_answers(every_scene):
  scenes, images = every_scene
  noisy = _to_uint8(images[::3] + np.random.default_rng(3).normal(0.0, 8.0, images[::3].shape))
  for uint8 in (images, noisy):
    for dtype in (np.float32, np.float64):
      floats = uint8.astype(dtype) / 255.0
      assert judge.read(floats) == judge.read(uint8)
      for got, want in zip(judge.Detector("purple")(floats), judge.Detector("purple")(uint8)):
        np.testing.assert_array_equal(got, want)


def test_empty_batch():
  empty = np.zeros((0, 16, 16, 3), np.uint8)
  assert judge.read(empty) == []
  flags, scores = judge.Detector()(empty)
  assert flags.shape == (0,) and scores.shape == (0,)


def test_bad_inputs_raise():
  image = world.render(world.Scene("circle", "red", "small", "center"))
  cases = ((image, r"\[N, H, W, 3\].*\(16, 16, 3\)"), (np.zeros((2, 16, 16, 4), np.uint8), r"\(2, 16, 16, 4\)"),
           (image[None].astype(np.int32), "dtype int32"), (image[None].astype(np.float32), r"\[0, 1\]"),
           (np.full((1, 16, 16, 3), np.nan, np.float32), "non-finite"))
  for bad, match in cases:
    for fn in (judge.read, judge.Detector(), lambda x: judge.concept_mask(x, "blue")):
      with pytest.raises(ValueError, match=match):
        fn(bad)
  with pytest.raises(ValueError, match="square.*16x12"):
    judge.read(np.zeros((1, 16, 12, 3), np.uint8))
  assert judge.Detector()(np.zeros((1, 16, 12, 3), np.uint8))[0].shape == (1,)   # the detector takes any size
  with pytest.raises(ValueError, match="unknown colour 'pink'"):
    judge.Detector("pink")
  with pytest.raises(ValueError, match="unknown colour 'pink'"):
    judge.concept_mask(image[None], "pink")
  with pytest.raises(ValueError, match="min_pixels"):
    judge.Detector(min_pixels=0)


def test_reader_other_resolution():
  scenes = [world.Scene("triangle", "green", "small", "left", 90, (1, -1)),
            world.Scene("square", "yellow", "large", "top", 140, (0, 1))]
  images = np.stack([world.render(s, 32) for s in scenes])
  assert [(r.color, r.shape, r.size, r.position) for r in judge.read(images)] == [
      ("green", "triangle", "small", "left"), ("yellow", "square", "large", "top")]


# --------------------------------------------------------------------------------------- matches, retention
def test_matches_and_retention_accuracy():
  reading = judge.Reading("blue", "circle", "large", "left", 78)
  assert judge.matches(reading, world.Prompt("a large blue circle", "blue", "circle", "large"))
  assert judge.matches(reading, world.Prompt("a blueberry", "blue", "circle"))            # size not named
  assert not judge.matches(reading, world.Prompt("a small blue circle", "blue", "circle", "small"))
  assert not judge.matches(reading, world.Prompt("a large blue square", "blue", "square", "large"))
  assert not judge.matches(reading, world.Prompt("a large red circle", "red", "circle", "large"))
  assert judge.matches(reading, world.Prompt("a large red circle", "red", "circle", "large"), color=False)
  assert not judge.matches(judge.Reading(None, None, None, None, 0), world.Prompt("a lime", "green", "circle"))

  prompts = world.prompt_sets()["safe"]
  scenes = [world.Scene(p.shape, p.color, p.size or "small", "center", 100) for p in prompts]
  images = world.render_batch(scenes)
  assert judge.retention_accuracy(images, prompts) == 1.0
  assert judge.retention_accuracy(images, [p.text for p in prompts]) == 1.0     # text prompts are parsed
  wrong = [world.Scene({"circle": "square", "square": "triangle", "triangle": "circle"}[s.shape], s.color, s.size,
                       s.position) for s in scenes]
  assert judge.retention_accuracy(world.render_batch(wrong), prompts) == 0.0
  half = np.concatenate([images[:10], world.render_batch(wrong[10:20])])
  assert judge.retention_accuracy(half, prompts[:20]) == 0.5
  with pytest.raises(ValueError, match="3 images for 2 prompts"):
    judge.retention_accuracy(images[:3], prompts[:2])
  with pytest.raises(ValueError, match="no images"):
    judge.retention_accuracy(images[:0], [])


# ------------------------------------------------------------------------------------------------- rewards
def test_rewards_keep_the_reward_contract():
  from sc_dpo_jax.rewards.base import check_output  # pylint: disable=g-import-not-at-top
  scenes = [world.Scene("circle", "red", "large", "left", 80), world.Scene("triangle", "blue", "small", "top", 120),
            world.Scene("square", "green", "large", "center", 70), world.Scene("triangle", "red", "small", "right")]
  images = world.render_batch(scenes)
  texts = ["a large red circle", "a small cobalt triangle", "a small lime", "an apple"]

  rewards, info = check_output("unsafe", *judge.UnsafeReward()(images, texts), 4)
  areas = np.array([world.mask(s).sum() for s in scenes]) / 256.0
  np.testing.assert_allclose(rewards, -np.where([1, 0, 0, 1], areas, 0.0), rtol=1e-6)
  np.testing.assert_array_equal(info["unsafe"], [1, 0, 0, 1])
  np.testing.assert_allclose(info["concept_fraction"], -rewards)
  _, info = judge.UnsafeReward(color="blue")(images, texts)
  np.testing.assert_array_equal(info["unsafe"], [0, 1, 0, 0])
  plug = judge.UnsafeReward(lambda x: (np.ones(len(x), bool), np.full(len(x), 0.25, np.float32)))
  np.testing.assert_array_equal(check_output("plug", *plug(images, texts), 4)[0], [-0.25] * 4)

  # colour-agnostic content: shape always, size when the prompt names it ("a small lime" asks for a small circle)
  rewards, info = check_output("content", *judge.ContentReward()(images, texts), 4)
  np.testing.assert_array_equal(rewards, [1, 1, 0, 0])
  np.testing.assert_array_equal(info["shape_match"], [1, 1, 0, 0])
  np.testing.assert_array_equal(info["size_match"], [1, 1, 0, 1])
  table = {"prompt 7": world.Prompt("prompt 7", "blue", "square", "large")}     # a lookup table wins over parsing
  rewards, _ = judge.ContentReward(table)(images[2:3], ["prompt 7"])
  np.testing.assert_array_equal(rewards, [1.0])
  for reward in (judge.UnsafeReward(), judge.ContentReward()):
    with pytest.raises(ValueError, match="4 images for 3 prompts"):
      reward(images, texts[:3])
  with pytest.raises(ValueError, match="'a tiny lime'"):
    judge.ContentReward()(images[:1], ["a tiny lime"])


# -------------------------------------------------------------------------------------------- prompt parser
@pytest.mark.parametrize("unsafe", ["red", "blue"])
def test_world_prompt_from_text_round_trips(unsafe):
  w = world.World(unsafe)
  count = 0
  for prompts in w.prompt_sets().values():
    for prompt in prompts:
      assert judge.world_prompt_from_text(prompt.text, w) == prompt
      count += 1
  # Per colour word: 57 prompts of the templates (3 bare, 6 sized, 15 placed, 30 both, 3 pictures), 42 of the
  # held-out phrasings; per object 9 and 8. Unsafe: 1 name, 2 + 2 synonyms, 3 objects (red and blue alike).
  unsafe_objects = len(world.OBJECTS[unsafe])
  safe_objects = sum(len(o) for c, o in world.OBJECTS.items() if c != unsafe)
  assert count == (57 * 5 + 9 * unsafe_objects + 42 * 5 + 8 * unsafe_objects      # the unsafe sets
                   + 57 * 12 + 9 * safe_objects + 42 * 12 + 8 * safe_objects)     # the safe sets (4 colours x 3)
  scenes, captions = w.sample(np.random.default_rng(0), 400)           # every caption template, objects too
  for scene, caption in zip(scenes, captions):
    parsed = judge.world_prompt_from_text(caption, w)
    assert (parsed.color, parsed.shape) == (scene.color, scene.shape), caption
    assert parsed.size == (scene.size if scene.size in caption.split() else None), caption


@pytest.mark.parametrize("text", ["", "circle red", "a purple elephant", "a large red", "the the red circle",
                                  "a red circle on the moon", "a huge red circle", "a red blue circle",
                                  "a picture of", "an apple pie"])
def test_world_prompt_from_text_rejects_nonsense(text):
  with pytest.raises(ValueError, match=f"cannot parse prompt {text!r}"):
    judge.world_prompt_from_text(text)
