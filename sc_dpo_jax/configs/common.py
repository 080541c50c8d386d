"""What every config builder shares: the variant check and the sections the DPO family and RL write alike.

Not a run config (it has no ``get_config``): ``dpo_family``, ``shielddiff_rl``, ``cost_model`` and ``toy``
build on it.
"""
import ml_collections
from ml_collections import config_dict


def choose_variant(variant: str, variants, default: str, where: str = "configs/<file>.py:<variant>") -> str:
  """``variant`` (empty: ``default``), checked against ``variants``; the error names them and ``where`` the
  variant is written. Every config builder (DPO, RL, cost model, toy) starts with it."""
  variant = variant or default
  if variant not in variants:
    raise ValueError(f"unknown config variant {variant!r}; choose one of {variants} ({where})")
  return variant


def pipeline_model(variant: str, **extra) -> ml_collections.ConfigDict:
  """``model.*`` of a trainer of a Stable Diffusion pipeline (DPO family, RL): the folder or the tiny random
  pipeline, the architecture the benchmarks build, compute dtype and attention; ``extra`` keys follow."""
  tiny = variant == "tiny"
  return ml_collections.ConfigDict(dict(
      path=config_dict.placeholder(str),     # a diffusers Stable Diffusion folder (required unless tiny)
      tiny=tiny,                             # a random tiny pipeline made in memory (models.tiny)
      architecture=variant,                  # UNet/text shapes for `python -m sc_dpo_jax.bench` (random weights)
      dtype="float32" if tiny else "bfloat16",   # compute dtype; parameters stay float32
      attention="reference" if tiny else "auto",   # auto: cuDNN flash on NVIDIA GPUs where it runs, else XLA
      **extra))


def train_section(**own) -> ml_collections.ConfigDict:
  """``train.*``: the trainer's ``own`` keys (steps, logging, ...), then the run keys every trainer reads
  (``train.harness.Run``: checkpoints kept and written in the background, resume across config changes, the
  NaN guard's patience, export at the end, the progress bar)."""
  return ml_collections.ConfigDict(dict(
      **own,
      keep_checkpoints=3,
      async_checkpoints=True,
      allow_config_change=False,   # resume a checkpoint saved with another method/model/LoRA
      max_nonfinite_in_a_row=5,    # the NaN guard: stop after this many skipped updates in a row
      export=True,                 # <workdir>/export at the end (pipeline with LoRA merged, or the cost model)
      progress=True))


def sample_keys(tiny: bool, tiny_prompts, every: int) -> dict:
  """The sample-grid keys of ``train.*`` (``train.outputs.sample_grid``): grids of ``eval_prompts`` every
  ``every`` steps (tiny: only at the end)."""
  return dict(
      sample_every=0 if tiny else every,     # sample grids of eval_prompts (0: only at the end)
      eval_prompts=tiny_prompts if tiny else ("a photo of a woman on a beach", "a portrait of a man"),
      sample_steps=10 if tiny else 30,
      sample_guidance=5.0 if tiny else 7.5)


def add_mesh(c: ml_collections.ConfigDict) -> None:
  """``mesh``, ``min_shard_size`` and ``mesh_rules`` (``parallel.make_mesh``, ``parallel.rules_from_config``)."""
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.min_shard_size = 2 ** 14
  # Logical axis -> mesh axes rules (parallel.rules_from_config): None = parallel.DEFAULT_RULES, or pairs in
  # priority order, e.g. --config.mesh_rules="(('embed', 'fsdp'), ('heads', ('tensor', 'fsdp')), ...)"
  c.mesh_rules = config_dict.placeholder(tuple)


def name_list(config: ml_collections.ConfigDict, key: str, known) -> tuple:
  """``config[key]`` as distinct names, each one of ``known``: a tuple, or a comma-separated string (what
  ``--config.<key>=a,b`` gives); empty or missing: none. Unknown or repeated names raise, naming the key."""
  value = config.get(key, ())
  items = [value] if isinstance(value, str) else list(value)
  out = tuple(n.strip() for item in items for n in str(item).split(",") if n.strip())
  unknown = [n for n in out if n not in known]
  if unknown:
    raise ValueError(f"config.{key} = {value!r}: unknown {unknown}; known: {tuple(known)}")
  if len(set(out)) != len(out):
    raise ValueError(f"config.{key} = {value!r}: a name is given twice")
  return out
