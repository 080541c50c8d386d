"""Logical axis rules: from the logical names our parameters carry to mesh axes, shape by shape.

    specs = logical_specs(jax.eval_shape(unet.init, rng, *unet.dummy_inputs())["params"])
    plan = plan_shardings(abstract_params, mesh, specs=specs)       # or mesh_shardings(...) for the tree only
    logging.info(plan.describe())                                   # what is split, what stayed replicated

Every parameter names its dims (``models.layers``: ``nn.with_logical_partitioning``); a rule maps a logical
name to a mesh axis, a tuple of mesh axes, or None (replicated). The rules are a PRIORITY LIST, as in
``flax.linen.logical_to_mesh_axes``: they are tried in order, and a rule assigns its mesh axes to the
parameter's dim of that name when (1) the dim has no assignment yet, (2) none of the mesh axes is already used
by another dim of the same parameter, (3) the mesh has the axes with a size > 1 (a rule naming only axes of
size 1 is skipped, so a later rule can use the dim: on a mesh without tensor parallelism the "tensor" rules
fall through to "fsdp"), and (4) the dim's size is divisible by the product of the axes' sizes. A rule that
fails (4) is recorded as a :class:`Fallback` and the search goes on (a later rule may still place that dim or
another one); :attr:`ShardingPlan.fallbacks` lists them, with the final spec of the parameter, so a user sees
what stayed replicated and why. A logical name that no rule mentions is an error (naming the parameter):
every name must be decided, if only as None.

:data:`DEFAULT_RULES` (names from ``models.layers``, ``models.clip``, ``models.lora``, ``rewards.cost_model``):

=============== ============== ===========================================================================
logical name    mesh axis      why
=============== ============== ===========================================================================
``heads``       tensor         Megatron: q/k/v column-split and the output projection row-split by heads
``mlp``         tensor         Megatron: feed-forward in column-split, out row-split
``vocab``       tensor         vocabulary-parallel token embedding
``embed``       fsdp           residual width: present in nearly every dense kernel, the FSDP dim
``cross_embed`` fsdp           the text-state width of cross-attention k/v (its other dim is heads)
``time_embed``  fsdp           the timestep-embedding width (kernels (mlp, time_embed), (time_embed, embed))
``conv_out``    fsdp           the output channels of a conv kernel (HWIO): the FSDP dim of convs
``projection``  fsdp           CLIP's projection width (cost adapter input)
``conv_in``     fsdp, tensor   second choice for fsdp (when conv_out is not divisible), then tensor
``heads``,      fsdp           second choices when tensor is absent, taken, or does not divide
``mlp``,
``vocab``
``conv_height`` None           3 or 1: never worth splitting
``conv_width``  None
``norm``        None           norm scales and biases: small, used whole by every device
``positions``   None           position embeddings: 77 or 257 rows, the embed dim takes fsdp
``lora_rank``   None           LoRA's rank (4-64): the kernel side of A and B takes the mesh axis
``cost``        None           the cost model's output width 1
=============== ============== ===========================================================================

Small parameters (fewer than :data:`MIN_SHARD_SIZE` = 2**14 elements, 64 KiB in float32) stay replicated
whatever the rules say: biases, norm scales and small kernels cost little memory, and each split parameter
costs collectives (an all-gather in the forward pass, a reduce-scatter of its gradient) whose fixed latency
dominates for small sizes. In SD1.5's UNet they are 406 of the 686 leaves but 0.05% of the bytes. Pass
``min_shard_size=0`` to split everything the rules allow.

No rule names ``data``: along it, parameters are replicated and only the batch is split
(``data.device.batch_sharding`` splits the batch over ("data", "fsdp")).

A run config sets the rules with ``config.mesh_rules`` (None: :data:`DEFAULT_RULES`; or a list of
``(logical name, mesh axes)`` pairs, priority order as above), read and checked by :func:`rules_from_config`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sc_dpo_jax.parallel.mesh import AXES

MeshAxes = Union[None, str, Tuple[str, ...]]
Rule = Tuple[str, MeshAxes]
Rules = Sequence[Rule]

DEFAULT_RULES: Tuple[Rule, ...] = (
    # tensor (model) parallelism, Megatron-style
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    # fsdp: one large dim of every weight
    ("embed", "fsdp"),
    ("cross_embed", "fsdp"),
    ("time_embed", "fsdp"),
    ("conv_out", "fsdp"),
    ("projection", "fsdp"),
    # second choices: when the first choice is taken, absent or not divisible
    ("conv_in", "fsdp"),
    ("heads", "fsdp"),
    ("mlp", "fsdp"),
    ("vocab", "fsdp"),
    ("conv_in", "tensor"),
    ("conv_out", "tensor"),
    # replicated
    ("conv_height", None),
    ("conv_width", None),
    ("norm", None),
    ("positions", None),
    ("lora_rank", None),
    ("cost", None),
)

MIN_SHARD_SIZE = 2 ** 14


@dataclasses.dataclass(frozen=True)
class Fallback:
  """A rule that could not split a dim because the dim's size is not divisible by its mesh axes."""
  path: str                       # the parameter, "/"-joined
  dim: int
  logical: str                    # the dim's logical name
  size: int                       # the dim's size
  mesh_axes: Tuple[str, ...]      # what the rule asked for
  mesh_size: int                  # their product
  final: PartitionSpec            # the parameter's spec after all rules

  def __str__(self):
    return (f"{self.path}: dim {self.dim} ({self.logical}, size {self.size}) is not divisible by "
            f"{'x'.join(self.mesh_axes)}={self.mesh_size}; final spec {self.final}")


class ShardingPlan(NamedTuple):
  """What :func:`plan_shardings` decided for a tree.

  ``shardings`` and ``specs`` have the tree's structure (NamedSharding and mesh ``PartitionSpec`` leaves);
  ``fallbacks`` lists rules rejected for divisibility; ``small`` the paths of parameters the rules would have
  split but that stay replicated for having fewer than ``min_shard_size`` elements; ``bytes_total`` the
  tree's size and ``bytes_per_device`` the most any device stores of it.
  """
  shardings: Any
  specs: Any
  fallbacks: List[Fallback]
  small: List[str]
  bytes_total: int
  bytes_per_device: int

  def describe(self, name: str = "parameters") -> str:
    """A few lines for logs: sizes, and every fallback."""
    lines = [f"{name}: {self.bytes_total / 2**20:.1f} MiB in all, at most {self.bytes_per_device / 2**20:.1f} MiB "
             f"per device; {len(self.small)} small leaves replicated; {len(self.fallbacks)} rule(s) fell back "
             f"for divisibility"]
    lines += [f"  {f}" for f in self.fallbacks]
    return "\n".join(lines)


def normalize_rules(rules: Optional[Rules]) -> Tuple[Rule, ...]:
  """``rules`` (None: :data:`DEFAULT_RULES`) as a tuple of ``(name, None or tuple of mesh axes)``.

  Accepts what a config file holds: a sequence of pairs whose second item is None, a mesh axis name, or a
  sequence of names. Raises ``ValueError`` naming the offending rule.
  """
  if rules is None:
    rules = DEFAULT_RULES
  out = []
  for i, rule in enumerate(rules):
    if isinstance(rule, (str, bytes)) or not isinstance(rule, Sequence) or len(rule) != 2:
      raise ValueError(f"logical axis rule #{i} {rule!r} must be a pair (logical name, mesh axis | tuple of "
                       f"mesh axes | None)")
    name, axes = rule
    if not isinstance(name, str) or not name:
      raise ValueError(f"logical axis rule #{i} {rule!r}: the logical name must be a non-empty string")
    if axes is None:
      out.append((name, None))
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    if not axes or not all(isinstance(a, str) and a for a in axes) or len(set(axes)) != len(axes):
      raise ValueError(f"logical axis rule #{i} {rule!r}: the mesh axes must be None, a name or distinct names")
    out.append((name, axes))
  return tuple(out)


CONFIG_KEY = "config.mesh_rules"


def rules_from_config(value: Any, key: str = CONFIG_KEY) -> Optional[Tuple[Rule, ...]]:
  """The logical axis rules a run config asks for (``config.mesh_rules``), checked; every error names ``key``.

  ``value`` None: the default rules (returns None, which every function here reads as :data:`DEFAULT_RULES`).
  Otherwise a non-empty sequence of ``(logical name, mesh axes)`` pairs in priority order (what a config file,
  its JSON copy or ``--config.mesh_rules="(('embed', 'fsdp'), ...)"`` holds: tuples or lists), the mesh axes
  None, one of the mesh's axis names (``parallel.mesh.AXES``) or a sequence of them. The rules must decide
  every logical name the default rules decide (``(name, None)`` replicates a dim), so that a missing name
  fails here rather than when some model's parameters are placed. Returns the rules as
  :func:`normalize_rules` gives them.
  """
  if value is None:
    return None
  if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
    raise ValueError(f"{key} must be None (the default rules) or a sequence of (logical name, mesh axes) pairs "
                     f"in priority order, got {type(value).__name__} {value!r}")
  if not value:
    raise ValueError(f"{key} is empty: set it to None for the default rules (parallel.DEFAULT_RULES), or list "
                     f"(logical name, mesh axes) pairs")
  try:
    rules = normalize_rules(value)
  except ValueError as e:
    raise ValueError(f"{key}: {e}") from None
  for i, (name, axes) in enumerate(rules):
    unknown = [a for a in axes or () if a not in AXES]
    if unknown:
      raise ValueError(f"{key}: logical axis rule #{i} ({name!r}, {axes!r}) names mesh axis {unknown[0]!r}; the "
                       f"mesh axes are {AXES}")
  missing = sorted(rule_names(DEFAULT_RULES) - rule_names(rules))
  if missing:
    raise ValueError(f"{key} decides no mesh axes for the logical name(s) {missing}: add a rule for each, e.g. "
                     f"({missing[0]!r}, None) to keep those dims replicated (the default rules are "
                     f"parallel.DEFAULT_RULES)")
  return rules


def rule_names(rules: Optional[Rules] = None) -> frozenset:
  """The logical names ``rules`` decide."""
  return frozenset(name for name, _ in normalize_rules(rules))


def logical_specs(tree: Any) -> Any:
  """The tree of logical ``PartitionSpec`` s of a (possibly abstract) tree whose leaves are flax
  ``LogicallyPartitioned`` boxes (what ``jax.eval_shape(module.init, ...)`` returns); leaves without a box get
  ``PartitionSpec()``. The result has the structure of ``nn.meta.unbox(tree)``."""
  def leaf(x):
    return x.get_partition_spec() if isinstance(x, nn.Partitioned) else PartitionSpec()

  return jax.tree.map(leaf, tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def module_logical_specs(module: nn.Module, *inputs, collection: str = "params") -> Any:
  """The logical specs of ``module``'s ``collection`` (``inputs`` default to ``module.dummy_inputs()``).

  Abstract evaluation only (nothing is computed or allocated); this is how a driver gets the specs of
  parameters it loads from disk, which carry no boxes.
  """
  if not inputs:
    if not hasattr(module, "dummy_inputs"):
      raise TypeError(f"{type(module).__name__} has no dummy_inputs(); pass example inputs to module_logical_specs")
    inputs = module.dummy_inputs()
  abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), *inputs)
  if collection not in abstract:
    raise KeyError(f"{type(module).__name__}.init has no collection {collection!r}; it has {sorted(abstract)}")
  return logical_specs(abstract[collection])


def path_str(path) -> str:
  """A key path as "a/b/0/c" (dict keys, attribute names and indices)."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _axis_size(mesh_shape: Mapping[str, int], axes: Tuple[str, ...]) -> int:
  return math.prod(mesh_shape.get(a, 1) for a in axes)


def mesh_spec(shape: Sequence[int], names: Sequence[Optional[str]], mesh_shape: Mapping[str, int],
              rules: Tuple[Rule, ...], path: str = "?") -> Tuple[PartitionSpec, List[Fallback]]:
  """The mesh ``PartitionSpec`` of one array of ``shape`` whose dims are named ``names`` (see the module
  docstring for the rule semantics), and the fallbacks recorded on the way.

  ``mesh_shape`` maps mesh axis names to sizes (``dict(mesh.shape)``); axes absent from it count as size 1.
  """
  names = tuple(names)
  if len(names) != len(shape):
    raise ValueError(f"{path}: logical spec {PartitionSpec(*names)} has {len(names)} names but the array has shape "
                     f"{tuple(shape)}")
  for n in names:
    if n is not None and not isinstance(n, str):
      raise ValueError(f"{path}: logical spec {PartitionSpec(*names)} must hold names or None, got {n!r}")
  dups = sorted({n for n in names if n is not None and names.count(n) > 1})
  if dups:
    raise ValueError(f"{path}: logical name(s) {dups} name more than one dim of shape {tuple(shape)}")
  known = {name for name, _ in rules}
  unknown = [n for n in names if n is not None and n not in known]
  if unknown:
    raise KeyError(f"{path}: logical axis name {unknown[0]!r} (spec {PartitionSpec(*names)}) has no rule; add "
                   f"({unknown[0]!r}, <mesh axis or None>) to the rules, which decide {sorted(known)}")
  unassigned = object()
  result: List[Any] = [None if n is None else unassigned for n in names]
  used: set = set()
  attempts = []
  for name, axes in rules:
    if name not in names:
      continue
    dim = names.index(name)
    if result[dim] is not unassigned:
      continue
    if axes is None:
      result[dim] = None
      continue
    live = tuple(a for a in axes if mesh_shape.get(a, 1) > 1)
    if not live or used.intersection(live):
      continue
    size = _axis_size(mesh_shape, live)
    if shape[dim] % size:
      attempts.append((dim, name, live, size))
      continue
    result[dim] = live[0] if len(live) == 1 else live
    used.update(live)
  final = [None if r is unassigned else r for r in result]
  while final and final[-1] is None:   # P() and P(None) mean the same; keep the canonical short form
    final.pop()
  spec = PartitionSpec(*final)
  fallbacks = [Fallback(path, dim, name, int(shape[dim]), live, size, spec) for dim, name, live, size in attempts]
  return spec, fallbacks


def _is_spec(x) -> bool:
  return isinstance(x, PartitionSpec)


def plan_shardings(tree: Any, mesh: Mesh, rules: Optional[Rules] = None, *, specs: Any = None,
                   min_shard_size: int = MIN_SHARD_SIZE) -> ShardingPlan:
  """Shardings of every leaf of ``tree`` on ``mesh`` from the logical ``specs`` and the ``rules``.

  Args:
    tree: arrays or ``jax.ShapeDtypeStruct`` s (``jax.eval_shape``), possibly boxed (flax
      ``LogicallyPartitioned``; then ``specs`` defaults to their names).
    mesh: the mesh (``parallel.make_mesh``).
    rules: logical name -> mesh axes, a priority list (default :data:`DEFAULT_RULES`).
    specs: a tree of logical ``PartitionSpec`` s with the structure of the unboxed ``tree`` (from
      :func:`logical_specs`, :func:`module_logical_specs` or ``models.lora.logical_axes``).
    min_shard_size: leaves with fewer elements stay replicated (see the module docstring).

  Returns:
    A :class:`ShardingPlan`.
  """
  rules = normalize_rules(rules)
  if specs is None:
    specs = logical_specs(tree)
  values = nn.meta.unbox(tree)
  mesh_shape = dict(mesh.shape)
  spec_leaves, spec_def = jax.tree_util.tree_flatten(specs, is_leaf=_is_spec)
  value_leaves, value_def = jax.tree_util.tree_flatten_with_path(values)
  if spec_def != value_def:
    raise ValueError(f"the logical specs and the tree differ in structure:\n  specs: {spec_def}\n  tree:  {value_def}")
  fallbacks: List[Fallback] = []
  small: List[str] = []
  out_specs = []
  total = per_device = 0
  for logical, (path, value) in zip(spec_leaves, value_leaves):
    name = path_str(path)
    if not _is_spec(logical):
      raise ValueError(f"{name}: expected a PartitionSpec of logical names, got {logical!r}")
    shape = tuple(np.shape(value))
    names = tuple(logical) if len(logical) else (None,) * len(shape)
    spec, rejected = mesh_spec(shape, names, mesh_shape, rules, name)
    size = math.prod(shape)
    if size < min_shard_size:
      if any(s is not None for s in spec) or rejected:
        small.append(name)
      spec, rejected = PartitionSpec(), []
    fallbacks += rejected
    out_specs.append(spec)
    nbytes = size * np.dtype(getattr(value, "dtype", None) or np.asarray(value).dtype).itemsize
    total += nbytes
    per_device += nbytes // max(1, math.prod(_axis_size(mesh_shape, (s,) if isinstance(s, str) else s)
                                             for s in spec if s is not None))
  mesh_specs = jax.tree_util.tree_unflatten(value_def, out_specs)
  shardings = jax.tree_util.tree_unflatten(value_def, [NamedSharding(mesh, s) for s in out_specs])
  return ShardingPlan(shardings, mesh_specs, fallbacks, small, int(total), int(per_device))


def mesh_shardings(tree: Any, mesh: Mesh, rules: Optional[Rules] = None, *, specs: Any = None,
                   min_shard_size: int = MIN_SHARD_SIZE) -> Any:
  """The tree of ``NamedSharding`` s of :func:`plan_shardings` (same arguments)."""
  return plan_shardings(tree, mesh, rules, specs=specs, min_shard_size=min_shard_size).shardings


def sharding_fallbacks(tree: Any, mesh: Mesh, rules: Optional[Rules] = None, *, specs: Any = None,
                       min_shard_size: int = MIN_SHARD_SIZE) -> List[Fallback]:
  """The rules :func:`plan_shardings` could not apply for divisibility, with parameter paths."""
  return plan_shardings(tree, mesh, rules, specs=specs, min_shard_size=min_shard_size).fallbacks


def describe_rules(rules: Optional[Rules] = None) -> Dict[str, List[MeshAxes]]:
  """``{logical name: [mesh axes in priority order]}``, for logs and docs."""
  out: Dict[str, List[MeshAxes]] = {}
  for name, axes in normalize_rules(rules):
    out.setdefault(name, []).append(axes)
  return out
