"""NudeNet (the `nudenet` package's 320n.onnx) through our batched runner, on ordinary images only.

Images: synthetic ones the test draws (noise, a gradient, shapes, a cartoon face, a black square) and variants of
the portrait matplotlib ships as sample data (``grace_hopper.jpg``: Grace Hopper in uniform), resized, cropped,
padded, mirrored and tiled, so images of many sizes with real detections. What the model gives on them (package
colour order): FACE_FEMALE 0.38 .. 0.75 on every portrait variant (several faces on the tiled ones), nothing above
the 0.25 floor on the synthetic images, no exposed class anywhere; with a 0.05 floor a few FEET_COVERED boxes
at 0.05 .. 0.09. Class filtering and the threshold are tested on those real outputs (FACE_FEMALE as the
configured class, thresholds set to observed scores).

Measured on this 2-core CPU: our batched runner equals the package's ``NudeDetector().detect`` on the same PNG
files exactly (same classes, scores and int boxes); batch sizes 1, 3, 16 give identical detections.
"""
import os

import matplotlib.cbook
import numpy as np
import pytest
from PIL import Image, ImageDraw

from sc_dpo_jax.rewards.base import WeightedSum, check_output
from sc_dpo_jax.rewards.nudenet import (DEFAULT_EXPOSED, DEFAULT_THRESHOLD, LABELS, MIN_SCORE, NudeNet,
                                        NudityReward, max_class_scores)

SCORE_TOL = 1e-4
BOX_TOL = 1


def portrait():
  path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
  return np.asarray(Image.open(path).convert("RGB"))


def cartoon_face(h, w):
  im = Image.new("RGB", (w, h), (120, 160, 200))
  d = ImageDraw.Draw(im)
  cx, cy, r = w // 2, h // 2, min(h, w) // 3
  d.ellipse([cx - r, cy - int(r * 1.3), cx + r, cy + int(r * 1.3)], fill=(230, 190, 160))
  for ex in (cx - r // 2, cx + r // 2):
    d.ellipse([ex - 10, cy - r // 3 - 8, ex + 10, cy - r // 3 + 8], fill=(255, 255, 255))
    d.ellipse([ex - 4, cy - r // 3 - 4, ex + 4, cy - r // 3 + 4], fill=(60, 40, 20))
  d.line([cx, cy - r // 6, cx - 6, cy + r // 4, cx + 4, cy + r // 4], fill=(180, 120, 100), width=3)
  d.arc([cx - r // 2, cy + r // 4, cx + r // 2, cy + r * 2 // 3], 20, 160, fill=(180, 60, 60), width=5)
  return np.asarray(im)


def shapes(h, w):
  im = Image.new("RGB", (w, h), (30, 120, 60))
  d = ImageDraw.Draw(im)
  d.rectangle([20, 20, w // 2, h // 2], fill=(200, 40, 40))
  d.ellipse([w // 3, h // 3, w - 10, h - 10], fill=(240, 220, 50))
  d.polygon([(5, h - 5), (w // 4, h // 2), (w // 2, h - 5)], fill=(40, 60, 220))
  return np.asarray(im)


@pytest.fixture(scope="module")
def synthetic():
  rng = np.random.default_rng(0)
  gradient = np.tile(np.linspace(0, 255, 512, dtype=np.float32)[None, :, None], (256, 1, 3)).astype(np.uint8)
  return [rng.integers(0, 256, (300, 400, 3), dtype=np.uint8), gradient, shapes(240, 320), cartoon_face(320, 256),
          np.zeros((64, 64, 3), np.uint8)]


@pytest.fixture(scope="module")
def portraits():
  gh = portrait()                                                  # (600, 512, 3)
  half = np.ascontiguousarray(gh[::2, ::2])
  return [np.ascontiguousarray(x) for x in (
      gh, half, np.tile(half, (2, 2, 1)), gh[:, ::-1], np.pad(gh, ((100, 0), (0, 300), (0, 0))),
      np.asarray(Image.fromarray(gh).resize((200, 230))), gh[100:450, 50:500], np.tile(gh[::3, ::3], (1, 3, 1)))]


@pytest.fixture(scope="module")
def detector():
  return NudeNet()


@pytest.fixture(scope="module")
def package():
  from nudenet import NudeDetector  # pylint: disable=g-import-not-at-top
  return NudeDetector()


def assert_same(a, b):
  """Two per-image detection lists agree: same classes in order, scores within 1e-4, boxes within a pixel."""
  assert len(a) == len(b)
  for i, (da, db) in enumerate(zip(a, b)):
    assert [d["class"] for d in da] == [d["class"] for d in db], (i, da, db)
    for x, y in zip(da, db):
      assert abs(x["score"] - y["score"]) <= SCORE_TOL, (i, x, y)
      assert max(abs(u - v) for u, v in zip(x["box"], y["box"])) <= BOX_TOL, (i, x, y)


def test_loads_the_package_model(detector):
  import nudenet  # pylint: disable=g-import-not-at-top
  import nudenet.nudenet as package_module  # pylint: disable=g-import-not-at-top
  assert os.path.dirname(detector.model_path) == os.path.dirname(nudenet.__file__)
  assert os.path.basename(detector.model_path) == "320n.onnx"
  assert detector.resolution == 320
  assert detector.labels == LABELS == tuple(getattr(package_module, "__labels"))
  assert detector.classes == DEFAULT_EXPOSED and detector.threshold == DEFAULT_THRESHOLD == 0.6
  assert detector.min_score == MIN_SCORE


def test_ordinary_images_have_no_exposed_detection(detector, synthetic, portraits):
  images = synthetic + portraits
  scores, detections = detector.nudity(images)
  flags, call_scores = detector(images)
  assert scores.dtype == np.float32 and scores.shape == (len(images),)
  assert flags.dtype == bool and flags.shape == (len(images),)
  np.testing.assert_array_equal(scores, 0.0)
  np.testing.assert_array_equal(call_scores, scores)
  assert not flags.any()
  assert all(d["class"] not in DEFAULT_EXPOSED for dets in detections for d in dets)
  # The synthetic images give nothing at all; every portrait variant gives a female face.
  assert all(not dets for dets in detections[:len(synthetic)])
  for dets in detections[len(synthetic):]:
    assert "FACE_FEMALE" in [d["class"] for d in dets]
    assert all(d["score"] > MIN_SCORE for d in dets)


def test_batching_gives_the_same_results(synthetic, portraits):
  images = [portraits[4], synthetic[0], portraits[2], portraits[5], synthetic[3], portraits[7], portraits[6]]
  assert len({im.shape for im in images}) == 7                    # 7 images, 7 sizes
  one_at_a_time = [NudeNet(batch_size=1).detect([im])[0] for im in images]
  assert sum(len(d) for d in one_at_a_time) >= 8                  # the comparison has detections to compare
  for batch_size in (1, 3, 16):
    assert_same(NudeNet(batch_size=batch_size).detect(images), one_at_a_time)


def test_matches_the_package_detect_on_files(detector, package, synthetic, portraits, tmp_path):
  images = portraits + synthetic[:3]
  paths = []
  for i, im in enumerate(images):
    paths.append(str(tmp_path / f"{i}.png"))
    Image.fromarray(im).save(paths[-1])
  expected = [package.detect(p) for p in paths]
  assert sum(len(d) for d in expected) >= 10
  assert_same(detector.detect(images), expected)


def test_rgb_order_matches_the_package_on_rgb_arrays(package, portraits):
  images = portraits[:4]
  rgb = NudeNet(package_color_order=False).detect(images)
  assert_same(rgb, [package.detect(im) for im in images])           # the package feeds arrays as given
  # The two orders really differ (the model sees other pixels): the portrait's face scores higher in RGB.
  bgr = NudeNet().detect(images[:1])
  assert rgb[0][0]["class"] == bgr[0][0]["class"] == "FACE_FEMALE"
  assert rgb[0][0]["score"] > bgr[0][0]["score"] + 0.05


def test_class_filtering_and_threshold_on_real_outputs(detector, synthetic, portraits):
  images = portraits + synthetic
  detections = detector.detect(images)
  faces = np.array([max([d["score"] for d in dets if d["class"] == "FACE_FEMALE"], default=0.0)
                    for dets in detections], np.float32)
  assert (faces[:len(portraits)] > 0.35).all() and (faces[len(portraits):] == 0).all()
  # A threshold equal to an observed score flags that image (>=) and splits the portraits.
  threshold = float(np.sort(faces[:len(portraits)])[len(portraits) // 2])
  face_detector = NudeNet(classes=["FACE_FEMALE"], threshold=threshold)
  scores, dets2 = face_detector.nudity(images)
  assert_same(dets2, detections)                                   # the classes only filter the score
  np.testing.assert_array_equal(scores, faces)
  flags, call_scores = face_detector(images)
  np.testing.assert_array_equal(flags, call_scores >= np.float32(threshold))
  np.testing.assert_array_equal(flags, faces >= np.float32(threshold))
  assert flags[np.flatnonzero(faces == np.float32(threshold))].all()
  assert 0 < flags.sum() < len(portraits)
  # A class that does not fire scores 0; a class list takes the max over its classes.
  male = max_class_scores(detections, ["FACE_MALE"])["FACE_MALE"]
  np.testing.assert_array_equal(NudeNet(classes="FACE_MALE").nudity(images)[0], male)
  both = NudeNet(classes=["FACE_MALE", "FACE_FEMALE"]).nudity(images)[0]
  np.testing.assert_array_equal(both, np.maximum(male, faces))


def test_lower_floor_adds_only_low_scores(detector, synthetic, portraits):
  images = portraits + synthetic
  default = detector.detect(images)
  low = NudeNet(classes=LABELS, threshold=0.05, min_score=0.05)
  detections = low.detect(images)
  extra = 0
  for dd, dl in zip(default, detections):
    assert_same([[d for d in dl if d["score"] > MIN_SCORE]], [dd])
    extra += sum(1 for d in dl if d["score"] <= MIN_SCORE)
    assert all(d["score"] > 0.05 for d in dl)
  assert extra >= 1                                                # the raw model does give low scores here
  scores = max_class_scores(detections, LABELS)
  expected = np.max(np.stack(list(scores.values())), axis=0)
  flags, got = low(images)
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(flags, expected >= np.float32(0.05))


def test_nudity_reward(detector, synthetic, portraits):
  images = [portraits[0], synthetic[0], portraits[1]]
  prompts = ["a portrait", "noise", "a small portrait"]
  reward = NudityReward(classes=("FACE_FEMALE", "FACE_MALE"), threshold=0.65)
  rewards, info = check_output("nudity", *reward(images, prompts), 3)
  scores = NudeNet(classes=("FACE_FEMALE", "FACE_MALE")).nudity(images)[0]
  np.testing.assert_array_equal(rewards, scores)
  assert set(info) == {"FACE_FEMALE", "FACE_MALE", "flag"}
  per_class = max_class_scores(reward.detector.detect(images), ("FACE_FEMALE", "FACE_MALE"))
  for name in ("FACE_FEMALE", "FACE_MALE"):
    np.testing.assert_array_equal(info[name], per_class[name])
  np.testing.assert_array_equal(rewards, np.maximum(info["FACE_FEMALE"], info["FACE_MALE"]))
  np.testing.assert_array_equal(info["flag"], (rewards >= np.float32(0.65)).astype(np.float32))
  assert rewards[1] == 0 and rewards[0] > 0.5 and rewards[2] > 0.5
  total, winfo = WeightedSum({"nudity": (-1.0, reward)})(np.stack([images[1]] * 2), prompts[:2])
  np.testing.assert_array_equal(total, 0.0)
  assert "nudity/flag" in winfo
  # Default classes: the exposed ones, none of which fires on these images.
  default = NudityReward(detector)
  r, info = default(images, prompts)
  np.testing.assert_array_equal(r, 0.0)
  assert set(info) == set(DEFAULT_EXPOSED) | {"flag"}
  with pytest.raises(ValueError, match="3 images for 2 prompts"):
    default(images, prompts[:2])
  with pytest.raises(ValueError, match="not both"):
    NudityReward(detector, threshold=0.5)


def test_input_forms(detector, portraits):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  batch = np.stack([portraits[0], portraits[3]])
  expected = detector.detect(list(batch))
  assert_same(detector.detect(batch), expected)
  assert_same(detector.detect(jnp.asarray(batch)), expected)
  assert detector.detect(np.zeros((0, 32, 32, 3), np.uint8)) == []
  flags, scores = detector(np.zeros((0, 32, 32, 3), np.uint8))
  assert flags.shape == scores.shape == (0,) and scores.dtype == np.float32


def test_bad_arguments(detector):
  image = np.zeros((32, 32, 3), np.uint8)
  with pytest.raises(ValueError, match=r"unknown \['BREASTS'\].*FEMALE_BREAST_EXPOSED"):
    NudeNet(classes=["FEMALE_BREAST_EXPOSED", "BREASTS"])
  with pytest.raises(ValueError, match="empty"):
    NudeNet(classes=[])
  with pytest.raises(ValueError, match="rank 3.*images\\[None\\]"):
    detector.detect(image)
  with pytest.raises(ValueError, match="4 channels"):
    detector.detect(np.zeros((1, 32, 32, 4), np.uint8))
  with pytest.raises(ValueError, match="dtype float32; expected uint8"):
    detector.detect(np.zeros((1, 32, 32, 3), np.float32))
  with pytest.raises(ValueError, match="image 1 has rank 2"):
    detector.detect([image, np.zeros((32, 32), np.uint8)])
  with pytest.raises(ValueError, match="empty"):
    detector.detect([np.zeros((0, 32, 3), np.uint8)])
  for threshold in (0.0, 1.5):
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
      NudeNet(threshold=threshold)
  with pytest.raises(ValueError, match="below min_score"):
    NudeNet(threshold=0.1)
  with pytest.raises(ValueError, match="batch_size"):
    NudeNet(batch_size=0)
