"""Build DUO pairs with a Stable Diffusion folder: unsafe images the detector flags, SDEdit-ed to safe ones.

  python -m sc_dpo_jax.data.build_duo_pairs --model=/models/sd15 --unsafe=prompts/unsafe.txt \\
      --safe_prompt="a dressed woman, realistic photo" --out=data/duo_pairs
  python -m sc_dpo_jax.data.build_duo_pairs --model=DIR --unsafe=pairs.csv --unsafe_column=unsafe \\
      --safe=pairs.csv --safe_column=safe --out=data/duo_pairs --detector=toy:red

METHODS.md's DUO curation (``data.curate.build_duo_pairs``): keep a generated image only when the detector
(NudeNet's exposed classes by default) flags it; SDEdit it with strength 0.75, guidance 7.5, the safe prompt,
and the unsafe prompt as negative prompt; keep the edit only when the detector clears it; retry with new seeds
up to ``--max_tries``. Resumable: run the same command again after an interruption. Prints the counts.
Each record's ``prompt`` is its unsafe prompt and ``prompt_chosen`` the safe prompt of its edit (what
``objective.duo_prompts = "given"``, the official ``--given_prompt``, conditions the safe image on).
"""
import json

from absl import app, flags

from sc_dpo_jax.data import curate

_MODEL = flags.DEFINE_string("model", None, "A diffusers Stable Diffusion folder.", required=True)
_UNSAFE = flags.DEFINE_string("unsafe", None, "Unsafe prompts: .txt (one per line), .csv or .jsonl.", required=True)
_UNSAFE_COLUMN = flags.DEFINE_string("unsafe_column", "prompt", "Column/field of --unsafe (csv, jsonl).")
_SAFE = flags.DEFINE_string("safe", None, "Safe counterpart prompts, one per unsafe prompt (same formats).")
_SAFE_COLUMN = flags.DEFINE_string("safe_column", "prompt", "Column/field of --safe.")
_SAFE_PROMPT = flags.DEFINE_string("safe_prompt", None, "One safe prompt for every unsafe prompt (instead of --safe).")
_OUT = flags.DEFINE_string("out", None, "Output dataset folder.", required=True)
_DETECTOR = flags.DEFINE_string("detector", "nudenet", "nudenet | nudenet:<threshold> | toy:<colour>.")
_STRENGTH = flags.DEFINE_float("strength", 0.75, "SDEdit strength.")
_GUIDANCE = flags.DEFINE_float("guidance", 7.5, "Guidance of generation and edit.")
_STEPS = flags.DEFINE_integer("steps", 50, "DDIM steps.")
_MAX_TRIES = flags.DEFINE_integer("max_tries", 4, "Attempts per prompt before it counts as failed.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per sampling batch.")
_PER_SHARD = flags.DEFINE_integer("prompts_per_shard", 16, "Prompts per output shard (the resume unit).")
_ATTENTION = flags.DEFINE_enum("attention", "reference", ["reference", "xla", "cudnn"], "Attention kernel.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a finished dataset in --out.")


def main(argv):
  del argv
  from sc_dpo_jax import models  # pylint: disable=g-import-not-at-top
  unsafe = curate.read_prompt_file(_UNSAFE.value, _UNSAFE_COLUMN.value)
  if (_SAFE.value is None) == (_SAFE_PROMPT.value is None):
    raise app.UsageError("give exactly one of --safe (a file) and --safe_prompt (one prompt for all)")
  safe = (curate.read_prompt_file(_SAFE.value, _SAFE_COLUMN.value) if _SAFE.value
          else [_SAFE_PROMPT.value] * len(unsafe))
  pipe = models.load_pipeline(_MODEL.value, attention=_ATTENTION.value)
  source = curate.build_duo_pairs(pipe, unsafe, safe, _OUT.value, detector=curate.make_detector(_DETECTOR.value),
                                  strength=_STRENGTH.value, guidance=_GUIDANCE.value, steps=_STEPS.value,
                                  max_tries=_MAX_TRIES.value, seed=_SEED.value, batch_size=_BATCH.value,
                                  prompts_per_shard=_PER_SHARD.value, overwrite=_OVERWRITE.value)
  from sc_dpo_jax.data import records  # pylint: disable=g-import-not-at-top
  print(json.dumps({"out": _OUT.value, "pairs": source.total, **records.read_info(_OUT.value)["stats"]}, indent=2))


if __name__ == "__main__":
  app.run(main)
