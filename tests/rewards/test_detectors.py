"""The detector registry (rewards/detectors.py): specs resolve through the plugins' own registrations, unknown
kinds name the registered ones, and ``data`` and ``eval`` import nothing of the toy world (checked on the source
with ``ast``: module-level imports, imports inside functions, and ``importlib.import_module`` calls)."""
import ast
import os

import numpy as np
import pytest

from sc_dpo_jax.rewards import detectors

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(ROOT, "sc_dpo_jax")
FORBIDDEN = "sc_dpo_jax.toy"


def _imported(path, root=ROOT):
  """Every module name ``path`` (a file under ``root``) imports anywhere in its code: ``import a.b``,
  ``from a import b`` (as ``a`` and ``a.b``, relative imports resolved), and ``importlib.import_module("a.b")``
  / ``__import__("a.b")``, with line numbers."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  package = os.path.relpath(path, root).split(os.sep)[:-1]    # a module's package; an __init__'s own
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names += [(node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
      names += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names]
    elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
      fn = node.func
      called = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
      if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
        names.append((node.lineno, node.args[0].value))
  return names


def _toy_imports(folder):
  found = []
  for dirpath, _, files in os.walk(os.path.join(PACKAGE, folder)):
    for name in sorted(files):
      if name.endswith(".py"):
        path = os.path.join(dirpath, name)
        found += [f"{os.path.relpath(path, ROOT)}:{line}: {module}" for line, module in _imported(path)
                  if module == FORBIDDEN or module.startswith(FORBIDDEN + ".")]
  return found


@pytest.mark.parametrize("folder", ["data", "eval"])
def test_data_and_eval_import_nothing_of_the_toy_world(folder):
  files = [f for _, _, fs in os.walk(os.path.join(PACKAGE, folder)) for f in fs if f.endswith(".py")]
  assert len(files) >= 5, files                     # the walk really looks at the package
  assert _toy_imports(folder) == []


def test_the_import_check_sees_every_form(tmp_path):
  # The toy package itself imports its modules in these forms; the check must see them.
  assert _toy_imports("toy")
  path = tmp_path / "sc_dpo_jax" / "data" / "x.py"
  path.parent.mkdir(parents=True)
  path.write_text("import importlib\n"
                  "from .. import toy\n"                               # relative, at module level
                  "def f():\n"
                  "  from sc_dpo_jax.toy.judge import Detector\n"      # inside a function
                  "  import sc_dpo_jax.toy.world as w\n"
                  "  from sc_dpo_jax import toy as t\n"
                  "  return importlib.import_module('sc_dpo_jax.toy.judge')\n")
  modules = [m for _, m in _imported(str(path), root=str(tmp_path))]
  hits = [m for m in modules if m == FORBIDDEN or m.startswith(FORBIDDEN + ".")]
  assert hits == ["sc_dpo_jax.toy", "sc_dpo_jax.toy.judge", "sc_dpo_jax.toy.judge.Detector", "sc_dpo_jax.toy.world",
                  "sc_dpo_jax.toy", "sc_dpo_jax.toy.judge"], modules


def test_toy_red_resolves_to_the_toy_judge():
  from sc_dpo_jax.toy import judge
  assert set(detectors.kinds()) >= {"nudenet", "toy"}
  kind, arg = detectors.lookup("toy:red")
  assert kind.name == "toy" and arg == "red" and kind.plugin == "sc_dpo_jax.toy.judge"
  detector = detectors.make("toy:red")
  assert isinstance(detector, judge.Detector) and detector.color == "red" and detector.min_pixels == 9
  assert detectors.make("toy").color == "red" and detectors.make("toy:blue").color == "blue"
  with pytest.raises(ValueError, match="unknown colour 'pink'"):
    detectors.make("toy:pink")
  assert detectors.lookup("nudenet:0.45") == (detectors.kinds()["nudenet"], "0.45")


def test_unknown_kind_names_the_registered_kinds():
  with pytest.raises(detectors.UnknownDetectorError) as e:
    detectors.make("clip:nsfw")
  message = str(e.value)
  assert message.startswith("--detector='clip:nsfw': unknown detector kind 'clip'")
  assert "registered kinds: nudenet (nudenet, nudenet:<threshold>); toy (toy, toy:<colour>)" in message
  assert isinstance(e.value, ValueError)


def test_a_registry_of_its_own_plugins_and_registrations():
  registry = detectors.Registry(plugins=["sc_dpo_jax.no_such_plugin", "sc_dpo_jax.toy.judge"])
  registry.register("always", lambda arg: (lambda images: (np.ones(len(images), bool), np.ones(len(images)))),
                    usage=("always",))
  assert set(registry.kinds()) == {"always", "toy"} and registry.kinds()["always"].plugin == ""
  flags, _ = registry.make("always")(np.zeros((2, 4, 4, 3), np.uint8))
  assert flags.tolist() == [True, True]
  with pytest.raises(ValueError, match="'toy' is already registered .by sc_dpo_jax.toy.judge."):
    registry.register("toy", lambda arg: None)
  registry.register("toy", lambda arg: "replaced", replace=True)
  assert registry.make("toy:red") == "replaced"
  with pytest.raises(ValueError, match=r"use letters, digits"):
    registry.register("a:b", lambda arg: None)
  # A plugin that does not import is skipped, and named when a kind is not found.
  with pytest.raises(ValueError, match=r"registered kinds: always \(always\); toy \(toy\).*plugin "
                     r"sc_dpo_jax.no_such_plugin did not load \(ModuleNotFoundError"):
    registry.make("nudenet")


def test_the_evaluation_gets_boxes_and_description_through_the_detector():
  from sc_dpo_jax.eval.detect import EvalDetector
  from sc_dpo_jax.toy import judge, world
  scenes = [world.Scene(shape=s, color=c, size="large", position="center") for s, c in
            [("circle", "red"), ("square", "blue"), ("triangle", "red")]]
  images = world.render_batch(scenes)
  detector = EvalDetector("toy:red")
  assert detector.kind == "toy" and detector.threshold is None
  assert detector.description == "toy judge: red pixels (score = their share of the image), flagged at >= 9 pixels"
  flags, scores, found = detector(images)
  want_flags, want_scores = judge.Detector("red")(images)
  np.testing.assert_array_equal(flags, want_flags)
  np.testing.assert_array_equal(scores, want_scores)
  assert flags.tolist() == [True, False, True] and found[1] == []
  for mask, score, (box,) in zip(judge.concept_mask(images[[0, 2]], "red"), scores[[0, 2]], [found[0], found[2]]):
    ys, xs = np.nonzero(mask)
    assert box == {"class": "red", "score": float(score),
                   "box": [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]}


def test_the_evaluation_refuses_a_detector_without_the_protocol(monkeypatch):
  from sc_dpo_jax.eval import detect
  registry = detectors.Registry(plugins=[])
  registry.register("bare", lambda arg: (lambda images: (np.zeros(len(images), bool), np.zeros(len(images)))))
  monkeypatch.setattr(detect.detectors, "lookup", registry.lookup)
  with pytest.raises(ValueError, match="the 'bare' detector .registered at run time. has no locate, description, "
                     "threshold"):
    detect.EvalDetector("bare")
