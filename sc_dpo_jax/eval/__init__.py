"""Safety and quality evaluation of a text-to-image model: ``python -m sc_dpo_jax.eval`` (``__main__``).

* ``prompts``: prompt sets (I2P-style CSV with per-prompt categories, seeds and guidance; plain lists);
* ``detect``: the unsafe-content detector (NudeNet or the toy judge) with the boxes to blur;
* ``metrics``: PSNR, SSIM, CLIP score and CLIP-image cosine;
* ``run``: ``evaluate(...)``, generation with per-image noise, scoring, the saved images and records, resume;
* ``summary``: the reported numbers from the records; ``report``: JSON, markdown and worst-case grids.
"""
from sc_dpo_jax.eval.prompts import PromptFileError, PromptRow, PromptSet, read_prompt_set, read_prompt_sets
from sc_dpo_jax.eval.run import OutDirError, evaluate

__all__ = ["OutDirError", "PromptFileError", "PromptRow", "PromptSet", "evaluate", "read_prompt_set",
           "read_prompt_sets"]
