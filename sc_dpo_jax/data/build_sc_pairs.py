"""Build SC-DPO pairs with a Stable Diffusion folder, scored by a safety cost model (and a preference score).

  python -m sc_dpo_jax.data.build_sc_pairs --model=/models/sd15 --harmful=prompts/harmful.txt \\
      --clean=prompts/clean.txt --cost_model=workdir/cost_model/export --cost_clip=/models/clip-vit-large-patch14 \\
      --clip=/models/clip-vit-large-patch14 --safe_negative="nudity, naked" --out=data/sc_pairs

``data.curate.build_sc_pairs``: ``--k`` samples per prompt (under a harmful prompt ``--k`` more with
``--safe_negative`` as negative prompt); harmful prompts give (lowest cost, highest cost) pairs, clean prompts
quality pairs of safe images ordered by the CLIP score (``--clip``) or, without it, by cost. Every record carries
both costs and the harmful flag. Resumable: run the same command again after an interruption.
"""
import json

from absl import app, flags

from sc_dpo_jax.data import curate

_MODEL = flags.DEFINE_string("model", None, "A diffusers Stable Diffusion folder.", required=True)
_HARMFUL = flags.DEFINE_string("harmful", None, "Harmful prompts: .txt, .csv or .jsonl.", required=True)
_CLEAN = flags.DEFINE_string("clean", None, "Clean prompts (same formats); optional.")
_COLUMN = flags.DEFINE_string("column", "prompt", "Column/field of the prompt files (csv, jsonl).")
_COST_MODEL = flags.DEFINE_string("cost_model", None, "A safety cost model folder (save_cost_model).", required=True)
_COST_CLIP = flags.DEFINE_string("cost_clip", None, "The CLIP folder the cost model was trained on.", required=True)
_CLIP = flags.DEFINE_string("clip", None, "A CLIPModel folder for the preference (CLIP score); optional.")
_OUT = flags.DEFINE_string("out", None, "Output dataset folder.", required=True)
_K = flags.DEFINE_integer("k", 4, "Samples per prompt.")
_SAFE_NEGATIVE = flags.DEFINE_string("safe_negative", "", "Negative prompt of the extra harmful-prompt samples.")
_MIN_GAP = flags.DEFINE_float("min_cost_gap", 0.0, "Harmful pairs need at least this cost gap.")
_SAFE_BELOW = flags.DEFINE_float("safe_below", 0.0, "Clean pairs use images with cost below this (the anchor: 0).")
_GUIDANCE = flags.DEFINE_float("guidance", 7.5, "Guidance.")
_STEPS = flags.DEFINE_integer("steps", 50, "DDIM steps.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per sampling batch.")
_PER_SHARD = flags.DEFINE_integer("prompts_per_shard", 16, "Prompts per output shard (the resume unit).")
_ATTENTION = flags.DEFINE_enum("attention", "reference", ["reference", "xla", "cudnn"], "Attention kernel.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a finished dataset in --out.")


def main(argv):
  del argv
  from sc_dpo_jax import models  # pylint: disable=g-import-not-at-top
  from sc_dpo_jax.rewards import ClipScore, CostReward, load_cost_model  # pylint: disable=g-import-not-at-top
  harmful = curate.read_prompt_file(_HARMFUL.value, _COLUMN.value)
  clean = curate.read_prompt_file(_CLEAN.value, _COLUMN.value) if _CLEAN.value else []
  pipe = models.load_pipeline(_MODEL.value, attention=_ATTENTION.value)
  cost_model, cost_params = load_cost_model(_COST_MODEL.value, _COST_CLIP.value)
  preference = None
  if _CLIP.value:
    text, text_params = models.load_clip_text(_CLIP.value)
    vision, vision_params = models.load_clip_vision(_CLIP.value)
    preference = ClipScore(text, text_params, vision, vision_params, models.load_tokenizer(_CLIP.value))
  source = curate.build_sc_pairs(pipe, harmful, clean, _OUT.value, cost=CostReward(cost_model, cost_params),
                                 preference=preference, k=_K.value, safe_negative=_SAFE_NEGATIVE.value,
                                 min_cost_gap=_MIN_GAP.value, safe_below=_SAFE_BELOW.value, steps=_STEPS.value,
                                 guidance=_GUIDANCE.value, seed=_SEED.value, batch_size=_BATCH.value,
                                 prompts_per_shard=_PER_SHARD.value, overwrite=_OVERWRITE.value)
  from sc_dpo_jax.data import records  # pylint: disable=g-import-not-at-top
  print(json.dumps({"out": _OUT.value, "pairs": source.total, **records.read_info(_OUT.value)["stats"]}, indent=2))


if __name__ == "__main__":
  app.run(main)
