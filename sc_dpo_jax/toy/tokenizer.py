"""The toy world's word-level CLIP tokenizer: every word of the world's vocabulary is one token.

    tok = word_tokenizer()                       # models.Tokenizer around a transformers CLIPTokenizer
    ids = tok(["a large ruby circle"])           # int32 [1, 16]: BOS, a, large, ruby, circle, EOS, EOS...
    save_word_tokenizer("out/tokenizer")         # vocab.json + merges.txt: transformers and diffusers read it

It is a real CLIP BPE tokenizer (lowercasing, CLIP's pre-tokenisation, the end-of-word suffix ``</w>``), so
``CLIPTokenizer.from_pretrained``, diffusers' pipelines and ``models.load_tokenizer`` read its folder. The
vocabulary holds the two special tokens (``<|startoftext|>`` = 0, ``<|endoftext|>`` = 1, also the padding and
unknown token, as in CLIP), every single character of ``CHARACTERS`` with and without ``</w>`` (so any other
lowercase word is still spelt out rather than lost), and the symbols of the merges. The merges are learned by
plain BPE on the world's words (each counted once, ties broken alphabetically) until every word is one symbol;
``word_tokenizer`` then checks that each vocabulary word encodes to exactly one id and raises naming the
words that do not.
"""
from __future__ import annotations

import collections
import json
import os
import string
import tempfile
from typing import Dict, List, Sequence, Tuple

from sc_dpo_jax.models.tokenizer import Tokenizer, load_tokenizer
from sc_dpo_jax.toy import world as world_lib

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
CHARACTERS = string.ascii_lowercase + string.digits + ",.!'-"
DEFAULT_MAX_LENGTH = 16


def learn_merges(words: Sequence[str]) -> List[Tuple[str, str]]:
  """BPE merges (in rank order) under which each of ``words`` is a single symbol ``word</w>``.

  Standard BPE training: every word starts as its characters (the last one with ``</w>``); the most frequent
  adjacent pair over all words (each word counted once; ties: the alphabetically first pair) is merged
  everywhere, until no word has two symbols left.
  """
  words = sorted(set(words))
  for w in words:
    bad = sorted(set(w) - set(CHARACTERS))
    if not w or bad:
      raise ValueError(f"word {w!r} is empty or has characters outside the tokenizer's alphabet: {bad}")
  segs = [list(w[:-1]) + [w[-1] + END_OF_WORD] for w in words]
  merges = []
  while True:
    counts = collections.Counter()
    for seg in segs:
      counts.update(zip(seg[:-1], seg[1:]))
    if not counts:
      return merges
    pair = min(counts, key=lambda p: (-counts[p], p))
    merges.append(pair)
    for i, seg in enumerate(segs):
      out, j = [], 0
      while j < len(seg):
        if j + 1 < len(seg) and (seg[j], seg[j + 1]) == pair:
          out.append(seg[j] + seg[j + 1])
          j += 2
        else:
          out.append(seg[j])
          j += 1
      segs[i] = out


def vocabulary(merges: Sequence[Tuple[str, str]]) -> Dict[str, int]:
  """Token -> id: the special tokens, the characters (plain and with ``</w>``), then each merge's symbol."""
  vocab = {BOS: 0, EOS: 1}
  for ch in CHARACTERS:
    vocab.setdefault(ch, len(vocab))
    vocab.setdefault(ch + END_OF_WORD, len(vocab))
  for a, b in merges:
    vocab.setdefault(a + b, len(vocab))
  return vocab


def word_tokenizer(world: world_lib.World = world_lib.DEFAULT, max_length: int = DEFAULT_MAX_LENGTH) -> Tokenizer:
  """A ``models.Tokenizer`` (a transformers ``CLIPTokenizer`` inside) in which every word of
  ``world.vocabulary()`` is one token; prompts are padded (with ``<|endoftext|>``) to ``max_length``."""
  with tempfile.TemporaryDirectory() as folder:
    save_word_tokenizer(folder, world, max_length)
    tok = load_tokenizer(folder)
  tok.source = "toy.tokenizer.word_tokenizer"
  check_single_tokens(tok, world.vocabulary())
  return tok


def save_word_tokenizer(folder: str, world: world_lib.World = world_lib.DEFAULT,
                        max_length: int = DEFAULT_MAX_LENGTH) -> None:
  """Writes the tokenizer folder as Stable Diffusion's ``tokenizer/`` holds it: ``vocab.json``, ``merges.txt``,
  ``tokenizer_config.json`` and ``special_tokens_map.json`` (read by every transformers version's
  ``CLIPTokenizer.from_pretrained``, slow or fast). Files of another tokenizer in ``folder`` are removed."""
  merges = learn_merges(world.vocabulary())
  os.makedirs(folder, exist_ok=True)
  for name in ("tokenizer.json", "added_tokens.json"):  # a saved fast tokenizer would shadow ours
    if os.path.exists(os.path.join(folder, name)):
      os.remove(os.path.join(folder, name))
  with open(os.path.join(folder, "vocab.json"), "w") as f:
    json.dump(vocabulary(merges), f, indent=2)
  with open(os.path.join(folder, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": int(max_length), "bos_token": BOS,
            "eos_token": EOS, "pad_token": EOS, "unk_token": EOS, "do_lower_case": True}
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
    json.dump({"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}, f, indent=2)


def check_single_tokens(tok: Tokenizer, words: Sequence[str]) -> None:
  """Raises ``ValueError`` naming the words that do not encode to exactly one id (BOS and EOS aside)."""
  bad = {}
  for w in words:
    ids = tok.hf(w, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
      bad[w] = tok.hf.convert_ids_to_tokens(ids)
  if bad:
    raise ValueError(f"{tok.source}: these words are not single tokens: {bad}")
