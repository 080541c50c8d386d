"""Evaluate a model's safety (and its prior preservation against a base) on prompt sets; write a report.

  python -m sc_dpo_jax.eval --model out/aligned --base models/sd15 --prompts data/i2p_benchmark.csv \\
      --prompts ringabell=attacks/ring_a_bell.csv --clip models/clip-vit-large-patch14 --out workdir/eval
  python -m sc_dpo_jax.eval --model sc_dpo_jax/toy/assets/base/pipeline --prompts p.txt --detector toy:red \\
      --steps 8 --limit 4

Writes ``<out>/report.md``, ``report.json``, ``grid_<set>.png``, ``records.jsonl``, ``manifest.json`` and every
image under ``<out>/images/`` (``sc_dpo_jax.eval.run`` says what each holds), and prints the report's path.
``--out`` is a local folder or a remote one (``gs://bucket/eval``, through ``etils.epath``).

Resume: records are written batch by batch, so a killed evaluation (I2P is hours on one GPU) loses at most the
batch in flight. Run the same command again (same --out, model, base, prompt sets, seeds and sampling flags)
and it continues where it stopped ("resuming: N of M images done"); an evaluation that finished only writes its
report again. Other settings for an --out that holds an evaluation are refused with an error naming them: use
another --out, or --overwrite to delete the earlier evaluation and start over.
"""
import os
import posixpath
import sys

from absl import app, flags

_MODEL = flags.DEFINE_string("model", None, "The model to evaluate: a diffusers Stable Diffusion folder.")
_BASE = flags.DEFINE_string("base", None, "The base model, for prior preservation and base-vs-model rates.")
_PROMPTS = flags.DEFINE_multi_string("prompts", None, "A prompt set: PATH or NAME=PATH (.csv I2P-style, .jsonl, "
                                     ".txt); repeat the flag for several.")
_COLUMN = flags.DEFINE_string("prompt_column", "prompt", "The prompt column (CSV) or field (JSONL).")
_OUT = flags.DEFINE_string("out", "workdir/eval", "Output folder: local, or remote (gs://bucket/eval).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Delete an earlier evaluation in --out and start over (without "
                                "it: an unfinished evaluation of the same settings is resumed, another refused).")
_DETECTOR = flags.DEFINE_string("detector", "nudenet", "nudenet, nudenet:<threshold> or toy:<colour>.")
_CLIP = flags.DEFINE_string("clip", None, "A transformers CLIPModel folder for CLIP scores (skipped without).")
_STEPS = flags.DEFINE_integer("steps", 50, "DDIM steps.")
_GUIDANCE = flags.DEFINE_float("guidance", 7.5, "Guidance scale for prompts whose file gives none.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for prompts whose file gives none.")
_ETA = flags.DEFINE_float("eta", 0.0, "DDIM eta (> 0: images depend on their batch).")
_NUM = flags.DEFINE_integer("num_images", 1, "Images per prompt.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per sampling batch.")
_HEIGHT = flags.DEFINE_integer("height", None, "Image height (default: the model's).")
_WIDTH = flags.DEFINE_integer("width", None, "Image width (default: the model's).")
_NEGATIVE = flags.DEFINE_string("negative_prompt", None, "Negative prompt for prompts whose file gives none.")
_LIMIT = flags.DEFINE_integer("limit", None, "Only the first N prompts of each set (smoke runs).")
_NO_BLUR = flags.DEFINE_bool("no_blur", False, "Do not pixelate the detections in the report's grids.")
_GRID = flags.DEFINE_integer("grid_size", 8, "Worst cases shown per set.")
_ATTENTION = flags.DEFINE_enum("attention", "reference", ["reference", "xla", "cudnn"], "Attention kernel.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Compute dtype.")
_SAFETY = flags.DEFINE_enum("safety", "none", ["none", "weak", "medium", "strong", "max"],
                            "Safe Latent Diffusion on the model's sampling (diffusers' presets; needs --guidance > 1).")
_SAFETY_CONCEPT = flags.DEFINE_string("safety_concept", None, "SLD's safety concept (default: diffusers' text).")
_PROJECTION = flags.DEFINE_list("projection", [], "SAFREE-style projection of the model's prompts away from these "
                                "concepts (comma-separated), e.g. nudity,naked.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.mark_flags_as_required(["model", "prompts"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from sc_dpo_jax.eval.run import OutDirError, evaluate  # pylint: disable=g-import-not-at-top
  safety = projection = None
  if _SAFETY.value != "none":
    from sc_dpo_jax.diffusion.safe_guidance import SLDConfig  # pylint: disable=g-import-not-at-top
    kwargs = {"concept": _SAFETY_CONCEPT.value} if _SAFETY_CONCEPT.value else {}
    safety = SLDConfig.preset(_SAFETY.value, **kwargs)
  elif _SAFETY_CONCEPT.value:
    raise app.UsageError("--safety_concept needs --safety")
  if _PROJECTION.value:
    from sc_dpo_jax.diffusion.prompt_projection import ProjectionConfig  # pylint: disable=g-import-not-at-top
    projection = ProjectionConfig(concepts=tuple(_PROJECTION.value))
  try:
    result = evaluate(_MODEL.value, _PROMPTS.value, base=_BASE.value, out_dir=_OUT.value, detector=_DETECTOR.value,
                      clip=_CLIP.value, steps=_STEPS.value, guidance=_GUIDANCE.value, seed=_SEED.value,
                      eta=_ETA.value, num_images=_NUM.value, batch_size=_BATCH.value, height=_HEIGHT.value,
                      width=_WIDTH.value, negative_prompt=_NEGATIVE.value, limit=_LIMIT.value,
                      prompt_column=_COLUMN.value, blur=not _NO_BLUR.value, grid_size=_GRID.value,
                      dtype=_DTYPE.value, attention=_ATTENTION.value, overwrite=_OVERWRITE.value,
                      progress=_PROGRESS.value, safety=safety, projection=projection)
  except OutDirError as e:       # --out holds another evaluation: the message says what differs and what to do
    sys.exit(f"error: {e}")
  report = result["paths"]["markdown"]
  report = report if "://" in report else os.path.abspath(report)
  print(f"report: {report} (and report.json, grid_*.png, records.jsonl, images/ in {posixpath.dirname(report)})")


if __name__ == "__main__":
  app.run(main)
