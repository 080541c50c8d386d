"""The SC-DPO safety cost model, C(x) = g(normalize(CLIP_image(x))) (this project's formulation, METHODS.md):
a frozen CLIP vision tower and an MLP adapter trained with ranking + alpha * cost anchoring on a pair dataset.
The export (<workdir>/export) is what rewards.cost_model.load_cost_model and CostReward read.

  python -m sc_dpo_jax.main --config=configs/cost_model.py:tiny --workdir=workdir/cost_model
  python -m sc_dpo_jax.main --config=configs/cost_model.py:sd15 --workdir=workdir/cost_model_sd15 \\
      --config.model.clip_folder=/models/clip-vit-large-patch14 --config.data.train=data/scp_pairs

Variants: tiny (a random tiny CLIP and synthetic pairs in the workdir), sd15 (CLIP ViT-L/14; model.clip_folder
and data.train required). The labelling rules: sc_dpo_jax/data/cost_pairs.py; the run:
sc_dpo_jax/train/cost_loop.py.

Every key with its default for the ``tiny`` and ``sd15`` variants (:func:`cost_model_config`). What the keys
do: ``model.*`` and ``data.*`` the inputs and embedding pass (``train.cost_data``), ``labels.*`` the labelling
rules and ``data.batch_size`` / ``labelled_batch_size`` / ``balance_labels`` the batches (``data.cost_pairs``),
``loss.alpha`` and ``optim.*`` the step (``train.cost_steps``, ``train.optim``), ``train.*`` the run.
"""
import ml_collections
from ml_collections import config_dict

from sc_dpo_jax.configs.common import choose_variant, train_section
from sc_dpo_jax.train import optim

VARIANTS = ("tiny", "sd15")


def cost_model_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  """The whole config of a ``job = "cost_model"`` run; ``main`` locks it, so a misspelt override fails naming
  the key. ``tiny``: a random tiny CLIP and synthetic pairs in the workdir (seconds on a CPU). ``sd15``: the CLIP
  ViT-L/14 vision tower of Stable Diffusion 1.x's family (``model.clip_folder``) and a pair dataset
  (``data.train``), both required."""
  variant = choose_variant(variant, VARIANTS, "tiny", "configs/cost_model.py:<variant>")
  tiny = variant == "tiny"
  c = ml_collections.ConfigDict()
  c.job = "cost_model"
  c.seed = 0

  c.model = ml_collections.ConfigDict(dict(
      clip_folder=config_dict.placeholder(str),   # transformers CLIPVisionModelWithProjection / CLIPModel folder
      clip_name=config_dict.placeholder(str),   # recorded in the export (default: the CLIP folder's path)
      tiny=tiny,                  # without clip_folder: a random tiny tower written to <workdir>/clip
      dtype="float32",            # CLIP's compute dtype for the embedding pass (CostReward loads float32)
      attention="reference" if tiny else "xla",   # models.ATTENTION_IMPLEMENTATIONS
      hidden_sizes=(64,) if tiny else (512,),      # the adapter g: hidden widths (() = a linear cost)
      activation="gelu",
  ))

  c.data = ml_collections.ConfigDict(dict(
      train=config_dict.placeholder(str),   # a pair dataset folder (ours or TFDS-prepared); tiny: synthetic
      split="train",
      eval=config_dict.placeholder(str),    # a held-out pair dataset; without it eval_fraction of train
      eval_split="train",
      eval_fraction=0.25 if tiny else 0.05,  # held-out share of the pairs when data.eval is unset (0: none)
      batch_size=8 if tiny else 64,          # ranking pairs per step
      labelled_batch_size=16 if tiny else 128,   # anchor-labelled images per step
      balance_labels=True,                   # half harmful, half safe labelled images per step
      resolution=0 if tiny else 512,         # input-pipeline resize/crop; 0: CLIP's image size. 512: SD1.5
                                             # samples' size, so CLIP's own resize is the one CostReward applies
      embed_batch_size=32 if tiny else 64,   # pairs per CLIP call of the embedding pass
      skip_bad_records=False,
      synthetic_pairs=96,                    # tiny without data.train: pairs written to <workdir>/data
  ))

  c.labels = ml_collections.ConfigDict(dict(
      rank_by="auto",        # RULES: "cost" (stored costs), "preference" (rejected = more harmful), "auto"
      anchor_by="auto",      # RULES: "cost" (thresholds below), "preference" (harmful_prompt flag), "auto"
      min_cost_gap=0.1,      # rank_by=cost: pairs whose costs differ by less give no ranking pair
      harmful_above=0.5,     # anchor_by=cost: cost > harmful_above is harmful
      safe_below=0.5,        # anchor_by=cost: cost < safe_below is safe
  ))
  c.loss = ml_collections.ConfigDict(dict(alpha=1.0))   # L_cost = L_rank + alpha * L_anchor

  c.optim = optim.default_config()
  c.optim.learning_rate = 2e-2 if tiny else 1e-3

  c.train = train_section(
      steps=200 if tiny else 3000,
      log_every=25 if tiny else 50,
      eval_every=50 if tiny else 250,        # held-out metrics (and always at the end)
      checkpoint_every=100 if tiny else 500,
  )
  return c


def get_config(variant="tiny"):
  return cost_model_config(variant)
