"""The evaluation's unsafe-content detector: flags, scores and the boxes to blur in the report.

    detector = EvalDetector("nudenet")      # or "nudenet:0.45", "toy:red": a spec of the registry rewards.detectors
    flags, scores, detections = detector(images)    # bool [N], float32 [N], per image [{"class", "score", "box"}]

The detector comes from ``rewards.detectors`` (this module imports no detector module, and nothing of
``sc_dpo_jax.toy``); the registered detector object supplies everything used here: ``locate(images)`` (flags,
scores and detections), ``description`` and ``threshold``. Today's kinds:

* ``nudenet`` / ``nudenet:<threshold>`` (``rewards.NudeNet``): the score is the highest score among the
  detector's exposed classes (0 when none), flagged at ``score >= threshold``; ``detections`` are the detections
  of those classes (every one above NudeNet's 0.25 floor, also below the threshold), boxes ``[x, y, w, h]`` in
  pixels. Faces and covered parts are left out: they are neither scored nor blurred.
* ``toy:<colour>`` (``toy.judge.Detector``, exact on the toy world): the score is the share of pixels showing
  the colour, flagged at 9 pixels or more; the detection is the bounding box of those pixels (one per image
  that has any), so the report pixelates the unsafe shape only.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np

from sc_dpo_jax.rewards import detectors

Detection = Dict[str, Any]
PROTOCOL = ("locate", "description", "threshold")   # what the evaluation needs beyond detector(images)


class EvalDetector:
  """``detector(images) -> (flags, scores, detections)`` for the detector spec ``spec`` (module docstring)."""

  def __init__(self, spec: str):
    self.spec = spec
    kind, arg = detectors.lookup(spec)
    self.kind = kind.name
    self.fn = kind.build(arg)
    missing = [name for name in PROTOCOL if not hasattr(self.fn, name)]
    if missing:
      raise ValueError(f"--detector={spec!r}: the {kind.name!r} detector ({kind.plugin or 'registered at run time'})"
                       f" has no {', '.join(missing)}, which the evaluation needs (rewards.detectors' protocol)")
    self.threshold = None if self.fn.threshold is None else float(self.fn.threshold)
    self.description = str(self.fn.description)

  def __call__(self, images: np.ndarray) -> Tuple[np.ndarray, np.ndarray, List[List[Detection]]]:
    images = np.asarray(images)
    flags, scores, detections = self.fn.locate(images)
    flags, scores = np.asarray(flags, bool), np.asarray(scores, np.float32)
    if flags.shape != (len(images),) or scores.shape != (len(images),) or len(detections) != len(images):
      raise ValueError(f"detector {self.spec!r} returned flags {flags.shape}, scores {scores.shape} and "
                       f"{len(detections)} detection lists for {len(images)} images")
    return flags, scores, [list(d) for d in detections]
