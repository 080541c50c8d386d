"""The registry of unsafe-content detectors, looked up by a spec string ("nudenet", "nudenet:0.45", "toy:red").

    detector = detectors.make("toy:red")              # the toy world's judge for red
    flags, scores = detector(images)                  # bool [N], float32 [N]: the data.curate plug
    flags, scores, boxes = detector.locate(images)    # + per image [{"class", "score", "box"}]: the evaluation's
    detector.description, detector.threshold          # one line for reports; the score cut of the flags, or None

A spec is ``KIND`` or ``KIND:ARG``; the kind names a registered :class:`DetectorKind`, whose ``build(ARG)``
makes the detector (``ARG`` is ``""`` for a bare ``KIND``). ``data.curate`` (the pair builders' ``--detector``)
and ``eval.detect`` (the evaluation's ``--detector``) get their detectors here and know no detector module:
neither imports ``sc_dpo_jax.toy``, and a new detector is a new plugin, not an edit of either.

**Where the kinds come from (plugins).** Each detector module registers its own kinds: it defines a hook
``register_detectors(registry)`` that calls ``registry.register(...)``. The registry knows the plugin modules by
name only, :data:`PLUGINS`, and imports them on the first lookup (or :func:`kinds`), like entry points: nothing
here imports a detector module before a detector is asked for, and a plugin imports nothing of the registry
(the toy judge stays numpy-only, and no import cycle is possible). Today's plugins:

* ``sc_dpo_jax.rewards.nudenet``: ``nudenet`` / ``nudenet:<threshold>`` (``rewards.NudeNet``);
* ``sc_dpo_jax.toy.judge``: ``toy`` / ``toy:<colour>`` (``toy.judge.Detector``, red by default).

A plugin that fails to import is skipped (so a missing optional dependency does not hide the other kinds) and
named, with its error, when a kind is not found. Code outside the package can add a kind at run time with
:func:`register`, or a module with :func:`add_plugin`.

**The detector protocol** (what ``build`` returns; both users check it):

* ``detector(images) -> (flags bool [N], scores float32 [N])``: flags the unsafe concept (``data.curate``);
* ``detector.locate(images) -> (flags, scores, detections)``: the same flags and scores, and per image the
  regions behind them, ``[{"class", "score", "box": [x, y, w, h]}]`` in pixels (the boxes the evaluation's
  report blurs);
* ``detector.description``: one line for the report; ``detector.threshold``: the score at or above which an
  image is flagged, or ``None`` when the flag is not a cut on the score (the toy judge counts pixels).

This module lives in ``rewards`` (not ``eval``): detectors are image scorers like the rewards, NudeNet is one of
them already, and both ``data`` and ``eval`` may import ``rewards``, while ``data`` must not import ``eval`` (whose
package loads the evaluation run and the models). Importing it loads the ``rewards`` package (JAX); callers that
must stay light (``data.curate``) import it when a detector is made.
"""
from __future__ import annotations

import dataclasses
import importlib
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

# The modules that register detector kinds, imported (in this order) on the first lookup.
PLUGINS: Tuple[str, ...] = ("sc_dpo_jax.rewards.nudenet", "sc_dpo_jax.toy.judge")
HOOK = "register_detectors"


@dataclasses.dataclass(frozen=True)
class DetectorKind:
  """One registered kind: ``build(arg)`` makes its detector from the text after ``KIND:`` (``""`` if none).
  ``usage`` lists the spec forms (for messages and ``--help``); ``plugin`` is the module that registered it."""
  name: str
  build: Callable[[str], Any]
  usage: Tuple[str, ...]
  summary: str = ""
  plugin: str = ""

  def describe(self) -> str:
    return f"{self.name} ({', '.join(self.usage)})"


class UnknownDetectorError(ValueError):
  """A spec whose kind is not registered; the message lists the registered kinds."""


class Registry:
  """Detector kinds by name, filled by the plugin modules' hooks on first use (module docstring)."""

  def __init__(self, plugins: Sequence[str] = PLUGINS):
    self._plugins: List[str] = list(plugins)
    self._loaded: set = set()
    self._failed: Dict[str, str] = {}
    self._kinds: Dict[str, DetectorKind] = {}
    self._lock = threading.RLock()
    self._registering: Optional[str] = None

  # -- registration ------------------------------------------------------------------------------------------
  def register(self, name: str, build: Callable[[str], Any], *, usage: Sequence[str] = (), summary: str = "",
               replace: bool = False) -> DetectorKind:
    """Registers kind ``name`` (letters, digits, ``_``, ``-``); ``usage`` defaults to ``(name,)``. A name that
    is taken raises ValueError unless ``replace``."""
    if not name or not all(c.isalnum() or c in "_-" for c in name):
      raise ValueError(f"detector kind {name!r}: use letters, digits, '_' and '-' (no ':')")
    if not callable(build):
      raise TypeError(f"detector kind {name!r}: build must be callable, got {build!r}")
    with self._lock:
      old = self._kinds.get(name)
      if old is not None and not replace:
        raise ValueError(f"detector kind {name!r} is already registered (by {old.plugin or 'a caller'}); pass "
                         "replace=True to replace it")
      kind = DetectorKind(name=name, build=build, usage=tuple(usage) or (name,), summary=summary,
                          plugin=self._registering or "")
      self._kinds[name] = kind
      return kind

  def add_plugin(self, module: str):
    """Adds a plugin module (imported, and its hook called, on the next lookup)."""
    with self._lock:
      if module not in self._plugins:
        self._plugins.append(module)

  def _load_plugins(self):
    with self._lock:
      for module in self._plugins:
        if module in self._loaded or module in self._failed:
          continue
        try:
          hook = getattr(importlib.import_module(module), HOOK)
        except (ImportError, AttributeError) as e:   # a missing optional dependency, or no hook
          self._failed[module] = f"{type(e).__name__}: {e}"
          continue
        self._registering = module
        try:
          hook(self)
        finally:
          self._registering = None
        self._loaded.add(module)

  # -- lookup ------------------------------------------------------------------------------------------------
  def kinds(self) -> Dict[str, DetectorKind]:
    """The registered kinds by name (after importing the plugins)."""
    self._load_plugins()
    return dict(self._kinds)

  def lookup(self, spec: str) -> Tuple[DetectorKind, str]:
    """``(kind, arg)`` for ``spec`` (``KIND`` or ``KIND:ARG``); UnknownDetectorError listing the kinds."""
    name, _, arg = str(spec).partition(":")
    kinds = self.kinds()
    if name not in kinds:
      known = "; ".join(k.describe() for k in kinds.values()) or "none"
      failed = "".join(f"; plugin {m} did not load ({why})" for m, why in self._failed.items())
      raise UnknownDetectorError(f"--detector={spec!r}: unknown detector kind {name!r}; registered kinds: "
                                 f"{known}{failed}")
    return kinds[name], arg

  def make(self, spec: str):
    """The detector of ``spec``: its kind's ``build(arg)``."""
    kind, arg = self.lookup(spec)
    return kind.build(arg)


REGISTRY = Registry()


def register(name: str, build: Callable[[str], Any], *, usage: Sequence[str] = (), summary: str = "",
             replace: bool = False) -> DetectorKind:
  """Registers a kind in the default registry (see :meth:`Registry.register`)."""
  return REGISTRY.register(name, build, usage=usage, summary=summary, replace=replace)


def add_plugin(module: str):
  """Adds a plugin module to the default registry (see :meth:`Registry.add_plugin`)."""
  REGISTRY.add_plugin(module)


def kinds() -> Dict[str, DetectorKind]:
  """The default registry's kinds by name."""
  return REGISTRY.kinds()


def lookup(spec: str) -> Tuple[DetectorKind, str]:
  """``(kind, arg)`` of ``spec`` in the default registry."""
  return REGISTRY.lookup(spec)


def make(spec: str):
  """The detector of ``spec`` from the default registry, e.g. ``make("nudenet:0.45")``."""
  return REGISTRY.make(spec)

