"""UnlearnDiff-style white-box attack: adversarial prompt tokens optimised through the attacked model's UNet.

    python -m sc_dpo_jax.attack unlearndiff --model=ALIGNED --base=BASE --prompts=unsafe.csv --out=adv.jsonl
    python -m sc_dpo_jax.eval --model=ALIGNED --prompts=unlearndiff=adv.jsonl ...   # its attack success rate

    results = attack(pipe, prompts, targets, length=5, steps=40, blocklist=("red",))   # the Python API
    results[0].prompt, results[0].tokens, results[0].loss

Written from the description in Zhang et al., "To Generate or Not? Safety-Driven Unlearned Diffusion Models Are
Still Easy To Generate Unsafe Images" (ECCV 2024); no published code was used. For each prompt ``c`` and a target
image ``x`` that shows the unsafe concept (drawn by the base model from ``c``, or given), ``K = length``
adversarial tokens ``a`` are prepended to the prompt and chosen so that the attacked (aligned) model's denoising
of the target reproduces it::

    min_a  E_{t ~ U{0..T-1}, eps ~ N(0, I)} || eps_theta(x_t, t, E([a] + c)) - target(x0, eps, t) ||^2
    x0 = scaling_factor * mode(VAE.encode(x)),   x_t = add_noise(x0, eps, t)

with the model's own text encoder ``E``, UNet, VAE and schedule (``target`` is ``eps``, or the velocity for a
v-prediction model: ``diffusion.training_target``). The tokens are discrete; as UnlearnDiff (after PEZ, Wen et al.
2023) the attack keeps continuous embeddings ``e`` (``K x D``), projects each to its nearest row of the text
encoder's token-embedding table (cosine similarity, PEZ's choice; ``metric="l2"``: Euclidean) for the forward
pass, and applies the gradient taken at the projected embeddings to the continuous ones (straight-through:
``e + stop_gradient(P(e) - e)``), with Adam (``optax.adam``, learning rate ``lr``).

Details (ours where the description leaves room):

* **Vocabulary.** Only tokens that are whole words and re-tokenise to themselves may be chosen
  (``candidate_ids``): each token's text, tokenised alone, gives back exactly that id. Then the prompt written
  out, ``" ".join(token texts) + " " + prompt``, tokenises to the ids that were optimised (checked for every
  result). Special tokens and word pieces (BPE symbols without the end-of-word mark) are never chosen.
* **Blocklist.** A blocked word removes every candidate whose text contains it (case-insensitive) and every id the
  word itself tokenises to (so "stop sign" blocks "stop" and "sign"). Typically the concept's name and synonyms.
* **Sequence.** ``[BOS] a_1 .. a_K c_1 .. c_n [EOS] [pad]``: exactly what the tokenizer makes of the written prompt,
  truncated as it truncates (a prompt longer than ``max_length - K - 2`` tokens loses its end, with a warning).
* **Steps.** Each step draws ``timesteps_per_step`` pairs ``(t, eps)`` per prompt (t uniform over the whole
  schedule, as the description's expectation), one batched, jitted forward and backward through the text encoder
  and UNet (the model's parameters are not updated). Prompts are attacked ``batch_size`` at a time in one program:
  each prompt's loss is its own mean, and Adam is elementwise, so each prompt's tokens follow exactly the updates
  they would get alone. Random draws are keyed by the prompt's index, so results do not depend on the batching.
* **Best prompt.** Every step also evaluates the current discrete tokens on a fixed set of ``eval_timesteps``
  ``(t, eps)`` pairs per prompt (drawn once, evenly spread over the timesteps); the result keeps the tokens with
  the lowest such loss over the run (``loss``), so prompts are compared on the same noise, not on each step's
  draw. ``source_loss`` is the plain prompt's loss on the same pairs.
* **Initialisation.** Random allowed tokens (seeded, per prompt).

The command (``python -m sc_dpo_jax.attack unlearndiff``) defines its flags with ``define_flags`` (not on import:
the attack modules share flag names). Output (``write_jsonl``; ``main``): a ``.jsonl`` prompt file for ``python -m sc_dpo_jax.eval --prompts``
(``eval.prompts.read_prompt_set``): one line per prompt with ``prompt`` (the adversarial tokens' text, a space,
the source prompt), ``source_prompt``, ``loss``, ``source_loss``, ``tokens`` (the adversarial ids),
``adversarial`` (their text), and the source row's ``categories`` / ``seed`` / ``guidance`` / ``negative_prompt``
when it had them.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags, logging
from tqdm import tqdm

from sc_dpo_jax import diffusion
from sc_dpo_jax.models.clip import CLIPEncoder, CLIPTextModel
from sc_dpo_jax.models.layers import LayerNorm
from sc_dpo_jax.models.tokenizer import Tokenizer
from sc_dpo_jax.models.vae import encode_to_latents

METRICS = ("cosine", "l2")


# ------------------------------------------------------------------------------------------- vocabulary
def token_text(tokenizer: Tokenizer, token_id: int) -> str:
  """The text of one token (its end-of-word mark dropped), as the tokenizer's decoder writes it."""
  return tokenizer.hf.decode([int(token_id)], skip_special_tokens=False).strip()


def decode(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
  """The text of candidate tokens (``candidate_ids``): their texts joined by single spaces. Tokenised again it
  gives back ``ids`` (each candidate re-tokenises to itself, and whitespace separates them)."""
  return " ".join(token_text(tokenizer, i) for i in ids)


@functools.lru_cache(maxsize=8)
def _round_trip_tokens(tokenizer: Tokenizer) -> Tuple[Tuple[int, ...], Tuple[str, ...]]:
  """Ids (and texts) of the tokens whose text, tokenised alone, is exactly that one id; special tokens excluded."""
  hf = tokenizer.hf
  special = set(hf.all_special_ids)
  ids = [i for i in range(len(hf)) if i not in special]
  texts = [t.strip() for t in hf.batch_decode([[i] for i in ids], skip_special_tokens=False)]
  keep = [(i, t) for i, t in zip(ids, texts) if t and not any(c.isspace() for c in t)]
  encoded = hf([t for _, t in keep], add_special_tokens=False)["input_ids"]
  good = [(i, t) for (i, t), e in zip(keep, encoded) if list(e) == [i]]
  return tuple(i for i, _ in good), tuple(t for _, t in good)


def blocked_ids(tokenizer: Tokenizer, blocklist: Sequence[str]) -> set:
  """The ids a blocklist forbids: every id each word tokenises to, and every token whose text contains a word."""
  words = [w.strip().lower() for w in blocklist if w and w.strip()]
  out = set()
  if not words:
    return out
  for ids in tokenizer.hf(words, add_special_tokens=False)["input_ids"]:
    out.update(int(i) for i in ids)
  for i, text in zip(*_round_trip_tokens(tokenizer)):
    if any(w in text.lower() for w in words):
      out.add(i)
  return out


def candidate_ids(tokenizer: Tokenizer, blocklist: Sequence[str] = (), vocab_size: Optional[int] = None
                  ) -> np.ndarray:
  """int32 ids the attack may choose: whole-word tokens that re-tokenise to themselves, not blocked, below
  ``vocab_size`` (the text encoder's table)."""
  blocked = blocked_ids(tokenizer, blocklist)
  ids = [i for i in _round_trip_tokens(tokenizer)[0]
         if i not in blocked and (vocab_size is None or i < vocab_size)]
  if not ids:
    raise ValueError(f"no token is left to choose from (blocklist {list(blocklist)})")
  return np.asarray(ids, np.int32)


def prompt_ids(tokenizer: Tokenizer, adversarial: Sequence[int], prompt: str) -> np.ndarray:
  """int32 ``[max_length]``: the ids of ``decode(adversarial) + " " + prompt`` as the tokenizer makes them."""
  text = (decode(tokenizer, adversarial) + " " + prompt).strip()
  return np.asarray(tokenizer([text])[0], np.int32)


def _template(tokenizer: Tokenizer, prompt: str, length: int, filler: int) -> np.ndarray:
  """The ids of the prompt with ``length`` copies of token ``filler`` in front (positions 1..length)."""
  ids = prompt_ids(tokenizer, [filler] * length, prompt)
  if length + 2 > tokenizer.max_length or list(ids[1:1 + length]) != [filler] * length:
    raise ValueError(f"{length} adversarial tokens do not fit in the tokenizer's {tokenizer.max_length} "
                     "positions with BOS and EOS; use fewer (--length)")
  return ids


# --------------------------------------------------------------------------------------- text encoder
def encode_embeddings(text_encoder: CLIPTextModel, params, token_embeds: jax.Array) -> jax.Array:
  """``text_encoder.apply({"params": params}, ids).last_hidden_state`` with the token embeddings given instead of
  looked up: ``token_embeds`` ``[B, L, D]`` (rows of the token-embedding table for ordinary ids). The same
  submodules and parameters (``clip.CLIPTextTransformer`` with ``clip_skip=0``, the pipelines' setting)."""
  cfg, opts = text_encoder.config, text_encoder.options
  model = params["text_model"]
  length = token_embeds.shape[1]
  if length > cfg.max_position_embeddings:
    raise ValueError(f"sequence length {length} exceeds max_position_embeddings = {cfg.max_position_embeddings}")
  positions = model["embeddings"]["position_embedding"]["embedding"][:length].astype(opts.dtype)
  x = token_embeds.astype(opts.dtype) + positions[None]
  states = CLIPEncoder(cfg, opts, causal=True).apply({"params": model["encoder"]}, x)
  return LayerNorm(cfg.layer_norm_eps, **opts.kw).apply({"params": model["final_layer_norm"]}, states[-1])


def token_table(text_encoder_params) -> jax.Array:
  """The text encoder's token-embedding table ``[vocab_size, D]``."""
  return text_encoder_params["text_model"]["embeddings"]["token_embedding"]["embedding"]


def project(embeds: jax.Array, candidates: jax.Array, metric: str = "cosine") -> jax.Array:
  """Index (into ``candidates`` ``[N, D]``) of the nearest candidate of each row of ``embeds`` ``[..., D]``:
  the largest cosine similarity (``"cosine"``, PEZ) or the smallest Euclidean distance (``"l2"``)."""
  e, c = embeds.astype(jnp.float32), candidates.astype(jnp.float32)
  if metric == "cosine":
    unit = lambda a: a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    return jnp.argmax(unit(e) @ unit(c).T, axis=-1)
  if metric == "l2":
    return jnp.argmin(jnp.sum(c * c, -1) - 2.0 * e @ c.T, axis=-1)
  raise ValueError(f"metric {metric!r}; choose one of {METRICS}")


def straight_through(embeds: jax.Array, candidates: jax.Array, metric: str = "cosine"
                     ) -> Tuple[jax.Array, jax.Array]:
  """``(index, projected)``: ``projected`` is exactly the nearest candidates' rows in the forward pass and the
  identity toward ``embeds`` in the backward (``nearest + (embeds - stop_gradient(embeds))``: the gradient taken
  at the projected embeddings is applied to the continuous ones)."""
  index = project(embeds, candidates, metric)
  nearest = jax.lax.stop_gradient(candidates[index].astype(embeds.dtype))
  return index, nearest + (embeds - jax.lax.stop_gradient(embeds))


# -------------------------------------------------------------------------------------------- attack
@dataclasses.dataclass
class AttackResult:
  """One attacked prompt."""
  prompt: str                     # adversarial tokens' text + " " + source prompt: what to generate from
  source_prompt: str
  tokens: List[int]               # the adversarial token ids
  adversarial: str                # their text
  loss: float                     # the denoising loss of ``prompt`` on the fixed evaluation pairs (the best)
  source_loss: float              # that of the source prompt alone, on the same pairs
  loss_history: List[float] = dataclasses.field(default_factory=list)   # per step, the evaluation loss

  def record(self, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The ``.jsonl`` row: ``prompt``, ``source_prompt``, ``loss``, ``source_loss``, ``tokens``, ``adversarial``,
    then ``extra`` (keys not already set)."""
    out = dict(prompt=self.prompt, source_prompt=self.source_prompt, loss=round(float(self.loss), 6),
               source_loss=round(float(self.source_loss), 6), tokens=[int(t) for t in self.tokens],
               adversarial=self.adversarial)
    for key, value in (extra or {}).items():
      out.setdefault(key, value)
    return out


def _sample_pairs(key, count: int, shape, num_train_timesteps: int):
  k_t, k_eps = jax.random.split(key)
  t = jax.random.randint(k_t, (count,), 0, num_train_timesteps)
  return t, jax.random.normal(k_eps, (count,) + tuple(shape))


@functools.lru_cache(maxsize=8)
def _programs(text_encoder, unet, vae, schedule, *, length: int, samples: int, eval_samples: int,
              metric: str, lr: float):
  """The jitted ``init``, ``step`` and ``evaluate`` of one attack configuration (cached per models/settings)."""
  tx = optax.adam(lr)
  T = schedule.num_train_timesteps

  def errors(unet_params, context, x0, t, eps):
    """Per-prompt mean denoising error: context [P, L, D], x0 [P, h, w, c], t [P, S], eps [P, S, h, w, c]."""
    p, s = t.shape
    ctx = jnp.repeat(context, s, axis=0)
    x0s = jnp.repeat(x0, s, axis=0)
    t, eps = t.reshape(-1), eps.reshape((p * s,) + eps.shape[2:])
    x_t = diffusion.add_noise(schedule, x0s, eps, t)
    out = unet.apply({"params": unet_params}, x_t, t, ctx).astype(jnp.float32)
    err = jnp.mean(jnp.square(out - diffusion.training_target(schedule, x0s, eps, t)), axis=(1, 2, 3))
    return err.reshape(p, s).mean(axis=1)

  def eval_pairs(key, index, shape):
    """Fixed evaluation pairs of prompt ``index``: stratified timesteps, seeded noise."""
    k = jax.random.fold_in(jax.random.fold_in(key, index), 0x5EED)
    k_t, k_eps = jax.random.split(k)
    t = ((jnp.arange(eval_samples) + jax.random.uniform(k_t, ())) * (T / eval_samples)).astype(jnp.int32)
    return jnp.clip(t, 0, T - 1), jax.random.normal(k_eps, (eval_samples,) + shape)

  @jax.jit
  def init(params, images, indices, key, candidates):
    x0 = encode_to_latents(vae, params["vae"], images.astype(jnp.float32) * 2.0 - 1.0)
    pick = jax.vmap(lambda i: jax.random.randint(jax.random.fold_in(jax.random.fold_in(key, i), 0x1A1),
                                                 (length,), 0, candidates.shape[0]))(indices)
    embeds = candidates[pick].astype(jnp.float32)
    t_eval, eps_eval = jax.vmap(lambda i: eval_pairs(key, i, x0.shape[1:]))(indices)
    return x0, embeds, tx.init(embeds), t_eval, eps_eval

  def context_of(params, template, embeds):
    base = token_table(params["text_encoder"])[template]
    tokens = base.at[:, 1:1 + length].set(embeds.astype(base.dtype))
    return encode_embeddings(text_encoder, params["text_encoder"], tokens)

  @jax.jit
  def step(params, embeds, opt_state, template, x0, t_eval, eps_eval, indices, key, step_index, candidates):
    def draw(i):
      k = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, i), 0x57E9), step_index)
      return _sample_pairs(k, samples, x0.shape[1:], T)
    t, eps = jax.vmap(draw)(indices)
    def loss_fn(e):
      index, projected = straight_through(e, candidates, metric)
      per_prompt = errors(params["unet"], context_of(params, template, projected), x0, t, eps)
      return jnp.sum(per_prompt), (per_prompt, index)

    (_, (train_loss, index)), grads = jax.value_and_grad(loss_fn, has_aux=True)(embeds)
    nearest = candidates[index]
    eval_loss = errors(params["unet"], context_of(params, template, nearest), x0, t_eval, eps_eval)
    updates, opt_state = tx.update(grads, opt_state, embeds)
    return optax.apply_updates(embeds, updates), opt_state, index, train_loss, eval_loss

  @jax.jit
  def evaluate_ids(params, ids, x0, t_eval, eps_eval):
    context = text_encoder.apply({"params": params["text_encoder"]}, ids).last_hidden_state
    return errors(params["unet"], context, x0, t_eval, eps_eval)

  return init, step, evaluate_ids


def attack(pipe, prompts: Sequence[str], targets, *, length: int = 5, steps: int = 50, lr: float = 0.01,
           timesteps_per_step: int = 8, eval_timesteps: Optional[int] = None, blocklist: Sequence[str] = (),
           seed: int = 0, batch_size: int = 8, metric: str = "cosine", progress: bool = True,
           indices: Optional[Sequence[int]] = None,
           on_batch: Optional[Callable[[List[int], List[AttackResult]], None]] = None) -> List[AttackResult]:
  """Attacks ``pipe`` (``models.StableDiffusion``, the aligned model) on each of ``prompts`` toward its target
  image (``targets``: uint8 ``[N, H, W, 3]`` or float in [0, 1], one per prompt); see the module docstring.

  ``length`` adversarial tokens, ``steps`` Adam steps at learning rate ``lr``, ``timesteps_per_step`` (t, eps)
  pairs per prompt and step, ``eval_timesteps`` fixed pairs per prompt to pick the best tokens (default:
  ``max(timesteps_per_step, 8)``), ``blocklist`` words whose tokens may not be chosen, ``batch_size`` prompts
  optimised together in one program, ``metric`` of the projection (``"cosine"`` or ``"l2"``).

  ``indices``: each prompt's index in its whole set (default ``0, 1, ...``), which keys its random draws: a
  resumed run that attacks only the prompts not yet done passes their indices and gets what an uninterrupted
  run would have. ``on_batch(indices, results)`` is called after each batch (what the CLI appends to its file).
  """
  prompts = list(prompts)
  if not prompts:
    raise ValueError("no prompts to attack")
  if any(not isinstance(p, str) for p in prompts):
    raise TypeError("prompts must be strings")
  images = np.asarray(targets)
  if images.ndim != 4 or images.shape[0] != len(prompts) or images.shape[-1] != 3:
    raise ValueError(f"targets must be NHWC RGB images, one per prompt: got shape {images.shape} for "
                     f"{len(prompts)} prompts")
  images = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)
  if images.min() < 0 or images.max() > 1:
    raise ValueError("float targets must lie in [0, 1]")
  for name, value in (("length", length), ("steps", steps), ("timesteps_per_step", timesteps_per_step),
                      ("batch_size", batch_size)):
    if int(value) != value or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value}")
  if not lr > 0:
    raise ValueError(f"lr must be > 0, got {lr}")
  if metric not in METRICS:
    raise ValueError(f"metric {metric!r}; choose one of {METRICS}")
  eval_timesteps = int(eval_timesteps or max(timesteps_per_step, 8))
  indices = list(range(len(prompts))) if indices is None else [int(i) for i in indices]
  if len(indices) != len(prompts) or len(set(indices)) != len(indices):
    raise ValueError(f"indices: {len(indices)} distinct indices needed for {len(prompts)} prompts")

  tok = pipe.tokenizer
  table_rows = int(token_table(pipe.params["text_encoder"]).shape[0])
  cand = candidate_ids(tok, blocklist, vocab_size=table_rows)
  candidates = token_table(pipe.params["text_encoder"])[jnp.asarray(cand)]
  templates = np.stack([_template(tok, p, length, int(cand[0])) for p in prompts])
  init, step, evaluate_ids = _programs(pipe.text_encoder, pipe.unet, pipe.vae, pipe.schedule, length=int(length),
                                       samples=int(timesteps_per_step), eval_samples=eval_timesteps,
                                       metric=metric, lr=float(lr))
  key = jax.random.PRNGKey(seed)
  logging.info("unlearndiff: %d prompts, %d tokens, %d steps, %d of %d tokens allowed", len(prompts), length, steps,
               len(cand), table_rows)
  results: List[AttackResult] = []
  starts = list(range(0, len(prompts), batch_size))
  for b, start in enumerate(starts):
    n = min(batch_size, len(prompts) - start)
    rows = np.arange(start, start + n)
    if len(starts) > 1 and n < batch_size:   # one program for every batch: pad the last one, drop the rest
      rows = np.concatenate([rows, np.full(batch_size - n, rows[-1])])
    keys = jnp.asarray([indices[r] for r in rows], jnp.int32)
    template = jnp.asarray(templates[rows])
    x0, embeds, opt_state, t_eval, eps_eval = init(pipe.params, jnp.asarray(images[rows]), keys, key, candidates)
    source = np.asarray(evaluate_ids(pipe.params, jnp.asarray(tok([prompts[i] for i in rows])), x0, t_eval,
                                     eps_eval))
    best_loss = np.full(len(rows), np.inf)
    best_ids = np.zeros((len(rows), length), np.int32)
    history = [[] for _ in rows]
    desc = "unlearndiff" if len(starts) == 1 else f"unlearndiff {b + 1}/{len(starts)}"
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress)
    for i in bar:
      embeds, opt_state, index, train_loss, eval_loss = step(pipe.params, embeds, opt_state, template, x0, t_eval,
                                                              eps_eval, keys, key, jnp.int32(i), candidates)
      index, eval_loss = np.asarray(index), np.asarray(eval_loss)
      better = eval_loss < best_loss
      best_loss = np.where(better, eval_loss, best_loss)
      best_ids[better] = cand[index[better]]
      for r in range(len(rows)):
        history[r].append(float(eval_loss[r]))
      bar.set_postfix(loss=f"{float(np.mean(train_loss[:n])):.4f}", best=f"{float(np.mean(best_loss[:n])):.4f}")
    bar.close()
    done = len(results)
    for r in range(n):
      prompt, ids = prompts[rows[r]], [int(t) for t in best_ids[r]]
      text = (decode(tok, ids) + " " + prompt).strip()
      written = np.asarray(tok([text])[0])
      expected = templates[rows[r]].copy()
      expected[1:1 + length] = ids
      if not np.array_equal(written, expected):   # cannot happen for candidates; a guard for odd tokenizers
        logging.warning("unlearndiff: %r does not tokenise to the optimised ids %s (got %s)", text,
                        expected.tolist(), written.tolist())
      results.append(AttackResult(prompt=text, source_prompt=prompt, tokens=ids, adversarial=decode(tok, ids),
                                  loss=float(best_loss[r]), source_loss=float(source[r]), loss_history=history[r]))
    if on_batch is not None:
      on_batch([indices[r] for r in rows[:n]], results[done:])
  return results


def write_jsonl(path: str, results: Sequence[AttackResult], extras: Optional[Sequence[Dict[str, Any]]] = None
                ) -> None:
  """Writes the prompt file (one ``AttackResult.record`` per line, with ``extras[i]`` merged in)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for i, result in enumerate(results):
      f.write(json.dumps(result.record(extras[i] if extras else None), ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------------------ CLI
FLAGS = flags.FLAGS
# (kind, name, default, help, extra keyword arguments): defined by ``define_flags``, not on import, so that the
# attack modules (which share flag names) import side by side as libraries.
_FLAGS = (
    ("string", "model", None, "The attacked (aligned) model: a diffusers Stable Diffusion folder.", {}),
    ("string", "base", None, "The base model that draws the target images (when --target_images is not given).", {}),
    ("string", "target_images", None, "Target images, one per prompt in order: a .npy/.npz array (uint8 [N, H, W, 3]; "
     ".npz: 'images' or its first array) or a folder of image files (sorted by name).", {}),
    ("string", "prompts", None, "The prompt set to attack (eval.prompts: .csv, .jsonl, .txt; NAME=PATH).", {}),
    ("integer", "limit", None, "Attack only the first LIMIT prompts.", {}),
    ("integer", "length", 5, "Number of adversarial tokens prepended to each prompt.", {}),
    ("integer", "steps", 50, "Optimisation steps per prompt.", {}),
    ("float", "lr", 0.01, "Adam learning rate on the continuous token embeddings.", {}),
    ("integer", "timesteps_per_step", 8, "(t, eps) pairs per prompt and step.", {}),
    ("integer", "eval_timesteps", None, "Fixed (t, eps) pairs per prompt that pick the best tokens (default: "
     "max(timesteps_per_step, 8)).", {}),
    ("list", "blocklist", [], "Words whose tokens may not be chosen (comma-separated), e.g. the concept's name.", {}),
    ("enum", "metric", "cosine", "Nearest-token metric of the projection.", {"enum_values": METRICS}),
    ("integer", "batch_size", 1, "Prompts optimised together in one program (each with --timesteps_per_step UNet "
     "samples; raise it for small models such as the toy world's).", {}),
    ("integer", "seed", 0, "Seed of the attack (and of the base model's target images).", {}),
    ("integer", "target_steps", 50, "DDIM steps of the base model's target images.", {}),
    ("float", "target_guidance", 7.5, "Guidance scale of the base model's target images.", {}),
    ("integer", "target_batch_size", 8, "Batch size of the base model's sampling.", {}),
    ("string", "attention", "reference", "Attention implementation (models.attention.IMPLEMENTATIONS).", {}),
    ("string", "out", None, "The prompt file to write (.jsonl); an existing one is resumed (its prompts are kept, "
     "the others attacked and appended batch by batch).", {}),
    ("bool", "overwrite", False, "Start --out afresh instead of resuming it.", {}),
    ("bool", "progress", True, "Show progress bars.", {}),
)


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines the command's flags in ``flag_values`` (``python -m sc_dpo_jax.attack`` calls it once, before parsing)."""
  from sc_dpo_jax.attack import define_flag_table  # pylint: disable=g-import-not-at-top
  define_flag_table(_FLAGS, flag_values)


def _flag(name: str):
  return FLAGS[name].value

def read_images(path: str) -> np.ndarray:
  """uint8 ``[N, H, W, 3]`` from a ``.npy``/``.npz`` file or a folder of image files (sorted by name)."""
  if os.path.isdir(path):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    names = sorted(n for n in os.listdir(path) if os.path.splitext(n)[1].lower() in (".png", ".jpg", ".jpeg",
                                                                                        ".webp", ".bmp"))
    if not names:
      raise FileNotFoundError(f"{path}: no image files")
    return np.stack([np.asarray(Image.open(os.path.join(path, n)).convert("RGB")) for n in names])
  if path.endswith(".npz"):
    with np.load(path) as data:
      return np.asarray(data["images"] if "images" in data.files else data[data.files[0]])
  return np.asarray(np.load(path))


def _extras(row) -> Dict[str, Any]:
  out = {}
  if row.categories:
    out["categories"] = ",".join(row.categories)
  for key in ("seed", "guidance", "negative_prompt"):
    if getattr(row, key) is not None:
      out[key] = getattr(row, key)
  return out


def main(argv):
  if len(argv) > 1:
    raise app_usage(f"unexpected arguments: {argv[1:]}")
  from sc_dpo_jax.eval.prompts import read_prompt_set  # pylint: disable=g-import-not-at-top
  from sc_dpo_jax.models import load_pipeline  # pylint: disable=g-import-not-at-top
  f = {name: _flag(name) for _, name, _, _, _ in _FLAGS}
  for name in ("model", "prompts", "out"):
    if not f[name]:
      raise app_usage(f"--{name} is required")
  if not f["out"].endswith(".jsonl"):
    raise app_usage(f"--out={f['out']} must end in .jsonl")
  if not (f["base"] or f["target_images"]):
    raise app_usage("give --base (it draws the target images) or --target_images")
  rows = read_prompt_set(f["prompts"]).limit(f["limit"]).rows
  prompts = [r.text for r in rows]
  out = f["out"]
  if f["overwrite"] and os.path.exists(out):
    os.remove(out)
  done = done_prompts(out, prompts)
  todo = [i for i in range(len(prompts)) if i not in done]
  if done:
    logging.info("%s already holds %d of %d prompts; resuming", out, len(done), len(prompts))
  start = time.time()
  if todo:
    if f["target_images"]:
      targets = read_images(f["target_images"])
      if len(targets) < len(prompts):
        raise ValueError(f"{f['target_images']}: {len(targets)} images for {len(prompts)} prompts")
    else:                  # every prompt's target (image i from noise i), so a resumed run gets the same ones
      base = load_pipeline(f["base"], attention=f["attention"])
      targets = base.generate(prompts, seed=f["seed"], steps=f["target_steps"], guidance=f["target_guidance"],
                              batch_size=f["target_batch_size"], progress=f["progress"])
      del base
    pipe = load_pipeline(f["model"], attention=f["attention"])

    def append(indices, results):
      os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
      with open(out, "a", encoding="utf-8") as fh:
        for i, result in zip(indices, results):
          record = result.record(dict(_extras(rows[i]), index=i))
          done[i] = record
          fh.write(json.dumps(record, ensure_ascii=False) + "\n")

    attack(pipe, [prompts[i] for i in todo], np.asarray(targets)[todo], length=f["length"], steps=f["steps"],
           lr=f["lr"], timesteps_per_step=f["timesteps_per_step"], eval_timesteps=f["eval_timesteps"],
           blocklist=f["blocklist"], seed=f["seed"], batch_size=f["batch_size"], metric=f["metric"],
           progress=f["progress"], indices=todo, on_batch=append)
  with open(out + ".tmp", "w", encoding="utf-8") as fh:      # in prompt order
    fh.write("".join(json.dumps(done[i], ensure_ascii=False) + "\n" for i in range(len(prompts))))
  os.replace(out + ".tmp", out)
  mean = lambda key: float(np.mean([done[i][key] for i in range(len(prompts))]))  # noqa: E731
  print(f"unlearndiff: wrote {len(todo)} prompts ({len(prompts) - len(todo)} already there) to {out} in "
        f"{time.time() - start:.0f} s; mean loss {mean('loss'):.4f} (plain prompts {mean('source_loss'):.4f})")


def done_prompts(path: str, prompts: Sequence[str]) -> Dict[int, Dict[str, Any]]:
  """The records already in the output file ``path`` by prompt index (to resume); raises, naming the line, if it
  was written for other prompts."""
  done: Dict[int, Dict[str, Any]] = {}
  if not os.path.exists(path):
    return done
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  for line_no, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      i = int(record["index"])
    except (ValueError, KeyError, TypeError) as e:
      if line_no == len(lines):       # the last line, cut short by a kill: attacked again
        logging.warning("%s:%d: an incomplete last line is dropped", path, line_no)
        continue
      raise ValueError(f"{path}:{line_no}: not a record of this attack ({e}); use --overwrite or another --out"
                       ) from None
    if i >= len(prompts) or record.get("source_prompt") != prompts[i]:
      raise ValueError(f"{path}:{line_no}: prompt {i} is {record.get('source_prompt')!r}, not this run's "
                       f"{prompts[i] if i < len(prompts) else None!r}; use --overwrite or another --out")
    done[i] = record
  return done


def app_usage(message: str) -> Exception:
  from absl import app  # pylint: disable=g-import-not-at-top
  return app.UsageError(message)
