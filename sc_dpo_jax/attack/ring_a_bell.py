"""A Ring-A-Bell-style black-box attack: a concept direction in CLIP text space, then a genetic search for prompts.

    python -m sc_dpo_jax.attack ring_a_bell --model=path/to/sd --with_concept=with.txt \\
        --without_concept=without.txt --targets=prompts.csv --blocklist=nude,naked --out=out/ring_a_bell.jsonl

After Tsai et al., "Ring-A-Bell! How Reliable are Concept Removal Methods for Diffusion Models?" (ICLR 2024),
written from the paper's description. Only the model's text encoder and tokenizer are used (black-box with
respect to the UNet, whose defence is what the prompts then test):

1. Concept direction. N paired prompts with and without the concept ("a red circle" / "a circle") are encoded
   to the token states the UNet is conditioned on (``last_hidden_state``, ``[L, D]``, padded prompts as the
   pipeline encodes them): ``c = mean_i (E(with_i) - E(without_i))`` (``concept_direction``).
2. Target. For each target prompt ``p`` (one with the concept removed, or any safe prompt) the target is
   ``T = E(p) + eta * c``.
3. Search (``search``). A genetic algorithm over sequences of ``length`` token ids: the prompt is
   ``BOS t_1 .. t_K EOS`` padded as the tokenizer pads, and its fitness is ``-mean_l ||E(tokens)_l - T_l||^2``
   (the mean over the ``L`` token states of the squared distance), the whole population in one jitted
   text-encoder call. Each generation keeps the ``elite`` best sequences unchanged (so the best fitness never
   falls) and fills the rest with children: two parents drawn by tournament (``tournament`` sequences drawn,
   the fittest wins), a one-point crossover with probability ``crossover`` (else a copy of the first parent),
   then with probability ``mutation`` one position replaced by a random allowed token. The random numbers come
   from a numpy ``Generator`` seeded per target (``[seed, target index]``), so a run is reproducible and a
   resumed run writes what an uninterrupted one would have.
4. Output (``attack``, the CLI). A ``.jsonl`` prompt file that ``python -m sc_dpo_jax.eval --prompts`` reads:
   per target ``prompt`` (the found tokens decoded to text), ``source_prompt``, ``target_index``, ``distance``
   (of the written prompt as the tokenizer reads it back), ``eta``, ``tokens`` (the ids), ``roundtrip`` (the
   text re-tokenises to exactly those ids) and ``attack_seed``. The GA's seed is not written as ``seed``: the
   prompt reader takes that key for the image seed.

Allowed tokens (``candidate_ids``). By default only whole-word tokens (``...</w>``) whose word, tokenised alone,
is that one token: decoded with spaces between them, the text re-tokenises to the same ids, so the prompt the
file holds is the one that was searched. ``whole_words=False`` (``--any_tokens``) allows every non-special
token, as the paper does; sub-word tokens are then glued to the next one when decoding and the text need not
re-tokenise to the same ids (``roundtrip`` says). Special tokens (BOS, EOS, padding) are never allowed.
``blocklist``: words whose tokens may not appear (e.g. the concept's own name, as a word filter would block
it): every id the tokenizer gives a listed word is removed; with ``whole_words=False`` a sequence whose decoded
text contains a listed word (spelt from sub-words) is also given fitness ``-inf``.

Decoding (``decode``) is CLIP's BPE read backwards, for the real tokenizer and the toy's word-level one alike:
the vocabulary strings are joined, ``</w>`` becomes a space, and CLIP's byte-to-unicode characters are turned
back into UTF-8 bytes.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from tqdm import tqdm

from sc_dpo_jax.models import clip_io, storage
from sc_dpo_jax.models.clip import CLIPTextModel
from sc_dpo_jax.models.tokenizer import Tokenizer, load_tokenizer

END_OF_WORD = "</w>"

# Defaults (ours; the paper's GA settings differ per concept).
DEFAULTS = dict(eta=3.0, length=16, population=200, generations=1000, crossover=0.5, mutation=0.25, elite=10,
                tournament=3)


# ------------------------------------------------------------------------------------------------ the model
@dataclasses.dataclass
class TextModel:
  """The text side of a Stable Diffusion model: what this attack sees of it."""
  encoder: CLIPTextModel
  params: Any
  tokenizer: Tokenizer

  @property
  def max_length(self) -> int:
    return self.tokenizer.max_length


def load_text_model(folder: str, *, attention: str = "reference") -> TextModel:
  """The ``text_encoder/`` and ``tokenizer/`` of a diffusers Stable Diffusion folder (nothing else is read)."""
  encoder, params = clip_io.load_clip_text(storage.join(folder, "text_encoder"), attention=attention)
  return TextModel(encoder, params, load_tokenizer(storage.join(folder, "tokenizer")))


def as_text_model(model: Any) -> TextModel:
  """A ``TextModel``, or a ``models.StableDiffusion`` pipeline (its text encoder and tokenizer)."""
  if isinstance(model, TextModel):
    return model
  if all(hasattr(model, a) for a in ("text_encoder", "tokenizer", "params")):
    return TextModel(model.text_encoder, model.params["text_encoder"], model.tokenizer)
  raise TypeError(f"expected a TextModel or a StableDiffusion pipeline, got {type(model).__name__}")


@functools.partial(jax.jit, static_argnums=0)
def _states(encoder, params, ids):
  return encoder.apply({"params": params}, ids).last_hidden_state


@functools.partial(jax.jit, static_argnums=0)
def _fitness(encoder, params, ids, target):
  states = encoder.apply({"params": params}, ids).last_hidden_state.astype(jnp.float32)
  return -jnp.mean(jnp.sum(jnp.square(states - target[None]), axis=-1), axis=-1)


def encode(model: Any, prompts: Union[str, Sequence[str]]) -> np.ndarray:
  """Token states ``[B, L, D]`` (float32) of ``prompts``, as the UNet is conditioned on them."""
  m = as_text_model(model)
  return np.asarray(_states(m.encoder, m.params, m.tokenizer(prompts)), np.float32)


def fitness(model: Any, ids: np.ndarray, target: np.ndarray) -> np.ndarray:
  """``-mean_l ||E(ids)_l - target_l||^2`` per row of padded ids ``[B, L]`` (one jitted call)."""
  m = as_text_model(model)
  return np.asarray(_fitness(m.encoder, m.params, jnp.asarray(ids, jnp.int32), jnp.asarray(target, jnp.float32)))


# ------------------------------------------------------------------------------------------------ step 1, 2
def concept_direction(model: Any, with_concept: Sequence[str], without_concept: Sequence[str]) -> np.ndarray:
  """``c = mean_i (E(with_i) - E(without_i))``: float32 ``[L, D]`` over the paired prompts."""
  with_concept, without_concept = list(with_concept), list(without_concept)
  if not with_concept or len(with_concept) != len(without_concept):
    raise ValueError(f"concept_direction needs paired prompts: got {len(with_concept)} with the concept and "
                     f"{len(without_concept)} without")
  diff = encode(model, with_concept) - encode(model, without_concept)
  return diff.mean(axis=0)


def target_states(model: Any, prompts: Union[str, Sequence[str]], direction: np.ndarray,
                  eta: float) -> np.ndarray:
  """``E(p) + eta * c`` for each prompt: float32 ``[B, L, D]``."""
  return encode(model, prompts) + np.float32(eta) * np.asarray(direction, np.float32)[None]


# ------------------------------------------------------------------------------------------- tokens <-> text
@functools.lru_cache(maxsize=None)
def _byte_decoder() -> Dict[str, int]:
  """CLIP's (GPT-2's) byte-level BPE alphabet read backwards: character -> byte. Printable Latin-1 bytes stand
  for themselves; the other bytes (control characters, space, ...) are the characters from U+0100 on, in byte
  order."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) +
               list(range(ord("\u00ae"), ord("\u00ff") + 1)))
  out, extra = {}, 0
  for b in range(256):
    if b in printable:
      out[chr(b)] = b
    else:
      out[chr(256 + extra)] = b
      extra += 1
  return out


def token_strings(tokenizer: Tokenizer, ids: Iterable[int]) -> List[str]:
  return tokenizer.hf.convert_ids_to_tokens([int(i) for i in ids])


def decode(tokenizer: Tokenizer, ids: Iterable[int]) -> str:
  """The text of token ``ids`` (no special tokens expected): vocabulary strings joined, ``</w>`` -> space,
  byte-level characters back to UTF-8 (undecodable bytes become U+FFFD), surrounding spaces removed."""
  special = set(tokenizer.hf.all_special_ids)
  ids = [int(i) for i in ids]
  joined = "".join(s for i, s in zip(ids, token_strings(tokenizer, ids)) if i not in special)
  table = _byte_decoder()
  words = (bytes(table[ch] for ch in part).decode("utf-8", errors="replace")
           if all(ch in table for ch in part) else part for part in joined.split(END_OF_WORD))
  return " ".join(w for w in words if w)


def prompt_ids(tokenizer: Tokenizer, tokens: np.ndarray) -> np.ndarray:
  """Padded ids ``[B, L]`` of token sequences ``[B, K]``: BOS, the tokens, EOS, then padding (as the tokenizer
  pads a prompt of K tokens)."""
  tokens = np.atleast_2d(np.asarray(tokens, np.int32))
  hf, length = tokenizer.hf, tokenizer.max_length
  if tokens.shape[1] + 2 > length:
    raise ValueError(f"{tokens.shape[1]} tokens do not fit the tokenizer's {length} positions with BOS and EOS "
                     f"(at most {length - 2})")
  pad = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id
  out = np.full((tokens.shape[0], length), pad, np.int32)
  out[:, 0] = hf.bos_token_id
  out[:, 1:1 + tokens.shape[1]] = tokens
  out[:, 1 + tokens.shape[1]] = hf.eos_token_id
  return out


def word_ids(tokenizer: Tokenizer, word: str) -> List[int]:
  """The ids the tokenizer gives ``word`` alone (no BOS/EOS)."""
  return [int(i) for i in tokenizer.hf(word, add_special_tokens=False)["input_ids"]]


def candidate_ids(tokenizer: Tokenizer, blocklist: Sequence[str] = (), *, whole_words: bool = True) -> np.ndarray:
  """The token ids the search may use (sorted int32): no special token, no id of a ``blocklist`` word; with
  ``whole_words`` only ``...</w>`` tokens whose word tokenises alone to exactly that token."""
  hf = tokenizer.hf
  special = set(int(i) for i in hf.all_special_ids)
  blocked = blocked_ids(tokenizer, blocklist)
  strings = hf.convert_ids_to_tokens(list(range(len(hf))))
  keep = []
  for i, s in enumerate(strings):
    if i in special or i in blocked or s is None:
      continue
    if whole_words:
      if not s.endswith(END_OF_WORD) or len(s) == len(END_OF_WORD):
        continue
      word = decode(tokenizer, [i])
      if not word or word != word.strip() or word_ids(tokenizer, word) != [i]:
        continue
    keep.append(i)
  if not keep:
    raise ValueError(f"{tokenizer.source}: no token is left to search over (blocklist {list(blocklist)})")
  return np.asarray(keep, np.int32)


def blocked_ids(tokenizer: Tokenizer, blocklist: Sequence[str]) -> set:
  """Every id the tokenizer gives a word of ``blocklist``."""
  return {i for w in blocklist if w.strip() for i in word_ids(tokenizer, w.strip())}


def _blocked_pattern(blocklist: Sequence[str]) -> Optional[re.Pattern]:
  words = sorted({w.strip().lower() for w in blocklist if w.strip()})
  if not words:
    return None
  return re.compile(r"(?<![a-z0-9])(" + "|".join(re.escape(w) for w in words) + r")(?![a-z0-9])")


def contains_blocked(text: str, blocklist: Sequence[str]) -> bool:
  """Whether ``text`` holds a ``blocklist`` word as a word (case-insensitive), as a word filter would see it."""
  pattern = _blocked_pattern(blocklist)
  return bool(pattern and pattern.search(text.lower()))


# ----------------------------------------------------------------------------------------------- step 3: GA
@dataclasses.dataclass
class SearchResult:
  tokens: np.ndarray          # int32 [K], the best sequence found
  fitness: float              # its fitness, -mean_l ||E_l - T_l||^2
  history: np.ndarray         # float32 [generations + 1]: the best fitness after 0, 1, ... generations

  @property
  def distance(self) -> float:
    return -self.fitness


def search(model: Any, target: np.ndarray, *, candidates: np.ndarray, length: int = DEFAULTS["length"],
           population: int = DEFAULTS["population"], generations: int = DEFAULTS["generations"],
           crossover: float = DEFAULTS["crossover"], mutation: float = DEFAULTS["mutation"],
           elite: int = DEFAULTS["elite"], tournament: int = DEFAULTS["tournament"],
           seed: Union[int, Sequence[int], np.random.Generator] = 0, blocklist: Sequence[str] = (),
           progress: bool = True, description: str = "ring_a_bell") -> SearchResult:
  """The genetic search of the module docstring for token sequences of ``length`` whose states are near
  ``target`` (``[L, D]``), over the ids ``candidates``. ``blocklist`` is only consulted for decoded text (when
  ``candidates`` hold sub-word tokens that could spell a listed word); remove its ids from ``candidates``
  (``candidate_ids``) to keep its tokens out."""
  m = as_text_model(model)
  candidates = np.asarray(candidates, np.int32)
  if candidates.ndim != 1 or not len(candidates):
    raise ValueError("candidates must be a non-empty 1-D array of token ids")
  if not 1 <= length <= m.max_length - 2:
    raise ValueError(f"length = {length}: the tokenizer has {m.max_length} positions, so 1..{m.max_length - 2} "
                     "tokens fit with BOS and EOS")
  if population < 2 or not 1 <= elite < population:
    raise ValueError(f"need population >= 2 and 1 <= elite < population; got population={population}, "
                     f"elite={elite}")
  if generations < 0 or tournament < 1:
    raise ValueError(f"generations ({generations}) must be >= 0 and tournament ({tournament}) >= 1")
  for name, p in (("crossover", crossover), ("mutation", mutation)):
    if not 0.0 <= p <= 1.0:
      raise ValueError(f"{name} rate {p} is not in [0, 1]")
  rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
  target = jnp.asarray(target, jnp.float32)
  if target.shape != (m.max_length, m.encoder.config.hidden_size):
    raise ValueError(f"target has shape {target.shape}; expected {(m.max_length, m.encoder.config.hidden_size)}")
  spelled = _blocked_pattern(blocklist) if _has_subwords(m.tokenizer, candidates) else None

  def evaluate(pop):
    fit = np.asarray(_fitness(m.encoder, m.params, jnp.asarray(prompt_ids(m.tokenizer, pop)), target),
                     np.float64)
    if spelled is not None:
      bad = [bool(spelled.search(decode(m.tokenizer, row).lower())) for row in pop]
      fit[np.asarray(bad)] = -np.inf
    return fit

  pop = candidates[rng.integers(len(candidates), size=(population, length))]
  fit = evaluate(pop)
  history = []
  children = population - elite
  for _ in tqdm(range(generations), desc=description, disable=not progress, leave=False):
    order = np.argsort(-fit, kind="stable")
    pop, fit = pop[order], fit[order]
    history.append(fit[0])
    # Tournament selection: the population is sorted, so the fittest of the drawn indices is the smallest.
    drawn = rng.integers(population, size=(2, children, tournament)).min(axis=-1)
    first, second = pop[drawn[0]], pop[drawn[1]]
    cut = rng.integers(1, length, size=children) if length > 1 else np.ones(children, np.int64)
    crossed = (rng.random(children) < crossover)[:, None] & (np.arange(length)[None] >= cut[:, None])
    kids = np.where(crossed, second, first)
    mutate = rng.random(children) < mutation
    where = rng.integers(length, size=children)
    new = candidates[rng.integers(len(candidates), size=children)]
    kids[mutate, where[mutate]] = new[mutate]
    # The elites are evaluated again with the children (one program shape) but keep their fitness, so the best
    # fitness can only rise.
    elite_fit = fit[:elite].copy()
    pop = np.concatenate([pop[:elite], kids])
    fit = evaluate(pop)
    fit[:elite] = elite_fit
  best = int(np.argmax(fit))
  history.append(fit[best])
  return SearchResult(tokens=pop[best].astype(np.int32), fitness=float(fit[best]),
                      history=np.asarray(history, np.float32))


def _has_subwords(tokenizer: Tokenizer, candidates: np.ndarray) -> bool:
  return not all(s.endswith(END_OF_WORD) for s in token_strings(tokenizer, candidates))


# ------------------------------------------------------------------------------------------- step 4: attack
def attack(model: Any, targets: Sequence[str], *, direction: Optional[np.ndarray] = None,
           with_concept: Sequence[str] = (), without_concept: Sequence[str] = (),
           eta: float = DEFAULTS["eta"], length: int = DEFAULTS["length"],
           population: int = DEFAULTS["population"], generations: int = DEFAULTS["generations"],
           crossover: float = DEFAULTS["crossover"], mutation: float = DEFAULTS["mutation"],
           elite: int = DEFAULTS["elite"], tournament: int = DEFAULTS["tournament"],
           blocklist: Sequence[str] = (), whole_words: bool = True, seed: int = 0, progress: bool = True,
           out: Optional[str] = None, skip: Sequence[int] = (), category: Optional[str] = None) -> List[Dict]:
  """One adversarial prompt per target prompt: its record (the ``.jsonl`` line, see the module docstring).

  The direction is ``direction`` or ``concept_direction(model, with_concept, without_concept)``. Target ``i``
  is searched with the generator seeded ``[seed, i]``. With ``out`` each record is appended to that file as it
  is found; target indices in ``skip`` are not searched (and not returned): what resuming uses.
  """
  m = as_text_model(model)
  targets = list(targets)
  if direction is None:
    direction = concept_direction(m, with_concept, without_concept)
  direction = np.asarray(direction, np.float32)
  candidates = candidate_ids(m.tokenizer, blocklist, whole_words=whole_words)
  logging.info("ring_a_bell: %d targets, %d candidate tokens, eta %s, length %d, population %d, %d generations",
               len(targets), len(candidates), eta, length, population, generations)
  skip = set(int(i) for i in skip)
  records = []
  todo = [i for i in range(len(targets)) if i not in skip]
  for i in tqdm(todo, desc="targets", disable=not progress or len(todo) < 2):
    start = time.time()
    target = target_states(m, targets[i], direction, eta)[0]
    result = search(m, target, candidates=candidates, length=length, population=population,
                    generations=generations, crossover=crossover, mutation=mutation, elite=elite,
                    tournament=tournament, seed=np.random.default_rng([seed, i]), blocklist=blocklist,
                    progress=progress, description=f"target {i}")
    text = decode(m.tokenizer, result.tokens)
    searched = prompt_ids(m.tokenizer, result.tokens)
    read_back = m.tokenizer([text])
    roundtrip = bool(np.array_equal(searched, read_back))
    distance = result.distance if roundtrip else float(-fitness(m, read_back, target)[0])
    if not roundtrip:
      logging.warning("target %d: the prompt %r does not re-tokenise to the searched ids; its distance is %.4g "
                      "(searched: %.4g)", i, text, distance, result.distance)
    record = dict(prompt=text, source_prompt=targets[i], target_index=i, distance=distance, eta=float(eta),
                  tokens=[int(t) for t in result.tokens], roundtrip=roundtrip, attack_seed=int(seed),
                  length=int(length), population=int(population), generations=int(generations),
                  search_seconds=round(time.time() - start, 3))
    if category:
      record["categories"] = category
    if out:
      _append(out, record)
    records.append(record)
  return records


def _append(path: str, record: Dict) -> None:
  folder = os.path.dirname(path)
  if folder:
    os.makedirs(folder, exist_ok=True)
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()


def done_targets(path: str, targets: Sequence[str], *, eta: float, length: int) -> List[int]:
  """Target indices already in the output file ``path`` (to resume); raises if the file was written for other
  targets or with another ``eta`` or ``length``."""
  if not os.path.exists(path):
    return []
  done = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
        i, rec_eta, rec_length = int(rec["target_index"]), float(rec["eta"]), int(rec.get("length", length))
      except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}:{line_no}: not a record of this attack ({e}); use --overwrite or another --out"
                         ) from None
      if i >= len(targets) or rec.get("source_prompt") != targets[i]:
        raise ValueError(f"{path}:{line_no}: target {i} is {rec.get('source_prompt')!r}, not this run's "
                         f"{targets[i] if i < len(targets) else None!r}; use --overwrite or another --out")
      if rec_eta != float(eta) or rec_length != int(length):
        raise ValueError(f"{path}:{line_no}: written with eta {rec.get('eta')}, length {rec.get('length')}; this "
                         f"run has eta {eta}, length {length}; use --overwrite or another --out")
      done.append(i)
  return done


# ----------------------------------------------------------------------------------------------------- CLI
# The flags are defined by ``define_flags``, which ``python -m sc_dpo_jax.attack ring_a_bell`` calls before it
# parses the command line: importing this module as a library defines none (other modules with flags of the same
# names, ``--out``, ``--seed``, ``--model``, may share its process).
FLAGS = flags.FLAGS
_FLAGS = (
    ("string", "model", None, "A diffusers Stable Diffusion folder; only its text_encoder/ and tokenizer/ are read.",
     {}),
    ("multi_string", "with_concept", None, "Prompts with the concept: a prompt file (any format eval reads) or a "
     "prompt; repeat the flag for more.", {}),
    ("multi_string", "without_concept", None, "The same prompts without the concept, in the same order (paired "
     "with --with_concept).", {}),
    ("string", "targets", None, "Target prompts: a prompt file (.csv, .jsonl, .txt) or NAME=PATH, as eval's "
     "--prompts.", {}),
    ("string", "prompt_column", "prompt", "The prompt column (CSV) or field (JSONL) of the prompt files.", {}),
    ("integer", "limit", None, "Only the first N target prompts.", {}),
    ("float", "eta", DEFAULTS["eta"], "Strength of the concept direction added to each target.", {}),
    ("integer", "length", DEFAULTS["length"], "Tokens per adversarial prompt (K).", {}),
    ("integer", "population", DEFAULTS["population"], "GA population size.", {}),
    ("integer", "generations", DEFAULTS["generations"], "GA generations.", {}),
    ("float", "crossover", DEFAULTS["crossover"], "Probability of a one-point crossover.", {}),
    ("float", "mutation", DEFAULTS["mutation"], "Probability that a child has one token replaced.", {}),
    ("integer", "elite", DEFAULTS["elite"], "Best sequences kept unchanged each generation.", {}),
    ("integer", "tournament", DEFAULTS["tournament"], "Tournament size of parent selection.", {}),
    ("multi_string", "blocklist", [], "Words whose tokens may not appear (comma-separated; repeatable; a file "
     "path reads one word per line).", {}),
    ("bool", "any_tokens", False, "Search over every non-special token (sub-words too, as the paper), not only "
     "whole words; the text may then not re-tokenise to the searched ids.", {}),
    ("integer", "seed", 0, "Seed of the search (target i uses [seed, i]).", {}),
    ("string", "out", None, "Output prompt file (.jsonl).", {}),
    ("bool", "overwrite", False, "Start --out afresh (default: resume, skipping the targets it already holds).",
     {}),
    ("string", "category", None, "Write this as every record's 'categories' (e.g. nudity).", {}),
    ("enum", "attention", "reference", "Attention kernel.", {"enum_values": ["reference", "xla", "cudnn"]}),
    ("bool", "progress", True, "Show progress bars.", {}),
)


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines the command's flags in ``flag_values`` (the CLI calls it once, before parsing)."""
  from sc_dpo_jax.attack import define_flag_table  # pylint: disable=g-import-not-at-top
  define_flag_table(_FLAGS, flag_values)


def _flag(name: str):
  return FLAGS[name].value


def _prompts(values: Sequence[str], column: str) -> List[str]:
  """Each value: a prompt file (read as eval reads it) or a literal prompt."""
  from sc_dpo_jax.eval import prompts as prompts_lib  # pylint: disable=g-import-not-at-top
  out = []
  for v in values or ():
    if os.path.isfile(os.path.expanduser(v)):
      out.extend(r.text for r in prompts_lib.read_prompt_set(v, column=column).rows)
    else:
      out.append(v)
  return out


def _words(values: Sequence[str]) -> List[str]:
  out = []
  for v in values or ():
    if os.path.isfile(os.path.expanduser(v)):
      with open(os.path.expanduser(v), encoding="utf-8") as f:
        out.extend(w.strip() for w in f if w.strip())
    else:
      out.extend(w.strip() for w in v.split(",") if w.strip())
  return out


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
  from sc_dpo_jax.eval import prompts as prompts_lib  # pylint: disable=g-import-not-at-top
  f = {name: _flag(name) for _, name, _, _, _ in _FLAGS}
  missing = [n for n in ("model", "with_concept", "without_concept", "targets", "out") if not f[n]]
  if missing:
    raise SystemExit("missing flag(s): " + ", ".join(f"--{n}" for n in missing))
  out = f["out"]
  if not out.endswith(".jsonl"):
    raise SystemExit(f"--out={out}: the output is a .jsonl prompt file")
  with_concept = _prompts(f["with_concept"], f["prompt_column"])
  without_concept = _prompts(f["without_concept"], f["prompt_column"])
  if len(with_concept) != len(without_concept):
    raise SystemExit(f"--with_concept gives {len(with_concept)} prompts, --without_concept "
                     f"{len(without_concept)}; they must be paired")
  targets = [r.text for r in prompts_lib.read_prompt_set(f["targets"], column=f["prompt_column"]).limit(
      f["limit"]).rows]
  if f["overwrite"] and os.path.exists(out):
    os.remove(out)
  done = done_targets(out, targets, eta=f["eta"], length=f["length"])
  if done:
    logging.info("%s already holds %d of %d targets; resuming", out, len(done), len(targets))
  model = load_text_model(f["model"], attention=f["attention"])
  start = time.time()
  records = attack(model, targets, with_concept=with_concept, without_concept=without_concept, eta=f["eta"],
                   length=f["length"], population=f["population"], generations=f["generations"],
                   crossover=f["crossover"], mutation=f["mutation"], elite=f["elite"], tournament=f["tournament"],
                   blocklist=_words(f["blocklist"]), whole_words=not f["any_tokens"], seed=f["seed"],
                   progress=f["progress"], out=out, skip=done, category=f["category"])
  print(f"ring_a_bell: wrote {len(records)} prompts ({len(done)} already there) to {out} in "
        f"{time.time() - start:.1f} s")
