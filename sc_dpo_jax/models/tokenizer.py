"""The CLIP tokenizer of a Stable Diffusion checkpoint (its ``tokenizer/`` folder), padded to the model length.

Tokenisation is host-side string work: this wraps transformers' ``CLIPTokenizer`` (read from local files only;
nothing is downloaded) and returns numpy int32 ids ready to be fed to ``models.clip.CLIPTextModel``.

Saved folders are read by every transformers version ``setup.py`` allows (4.46 to 5.x), slow ``CLIPTokenizer``
or ``CLIPTokenizerFast``: ``Tokenizer.save`` writes the fast tokenizer's ``tokenizer.json`` and the same BPE as the
slow tokenizer's ``vocab.json`` + ``merges.txt``, with ``special_tokens_map.json`` and ``tokenizer_config.json``
(the class and ``model_max_length``). Folders may be local or ``gs://`` URIs (``models.storage``).
"""
import json
import os
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
from absl import logging

from sc_dpo_jax.models import storage

# Every file a CLIP tokenizer folder may hold; a save replaces them all, so none of an older tokenizer survives.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json",
                   "added_tokens.json")
SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


class Tokenizer:
  """``tokenizer(prompts) -> int32 [len(prompts), max_length]``: BOS, tokens, EOS, then padding; prompts
  longer than ``max_length`` are truncated (with a warning naming them, as diffusers warns)."""

  def __init__(self, hf_tokenizer, source: str = "tokenizer"):
    self.hf = hf_tokenizer
    self.source = source
    self.max_length = int(hf_tokenizer.model_max_length)
    if not 0 < self.max_length < 100_000:
      raise ValueError(f"{source}: model_max_length is {hf_tokenizer.model_max_length}; set it in "
                       "tokenizer_config.json (77 for Stable Diffusion)")

  def __call__(self, prompts: Union[str, Sequence[str]]) -> np.ndarray:
    prompts = _as_list(prompts)
    ids = self.hf(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                  return_tensors="np")["input_ids"].astype(np.int32)
    full = self.hf(prompts, padding=False, truncation=False, verbose=False)["input_ids"]
    for i, row in enumerate(full):
      if len(row) > self.max_length:
        dropped = self.hf.decode(row[self.max_length - 1:-1])
        logging.warning("prompt %d is longer than %d tokens; this part was cut off: %r", i,
                        self.max_length, dropped)
    return ids

  def save(self, folder: str) -> None:
    """Writes a tokenizer folder that ``CLIPTokenizer`` and ``CLIPTokenizerFast`` of transformers 4.46 to 5.x load
    with the same ids as this one (local or ``gs://``; other tokenizer files in it are replaced):

    * ``tokenizer.json``: the fast tokenizer as it is (when ``hf`` is tokenizers-backed, as in transformers 5);
    * ``vocab.json`` and ``merges.txt``: the same BPE vocabulary and merges, in rank order (the slow tokenizer's);
    * ``added_tokens.json``: tokens added on top of that vocabulary, if any;
    * ``special_tokens_map.json`` and ``tokenizer_config.json``: the special tokens, ``tokenizer_class``
      ``CLIPTokenizer`` and ``model_max_length``.
    """
    vocab, merges = bpe_vocab_and_merges(self.hf, source=self.source)
    added = {token: int(i) for token, i in self.hf.get_added_vocab().items() if token not in vocab}
    specials = {key: str(getattr(self.hf, key)) for key in SPECIAL_TOKENS if getattr(self.hf, key, None) is not None}
    config = dict(tokenizer_class="CLIPTokenizer", model_max_length=self.max_length, do_lower_case=True,
                  errors="replace", **specials)
    for name in TOKENIZER_FILES:
      storage.remove(storage.join(folder, name))
    with storage.staged(folder) as local:
      backend = getattr(self.hf, "backend_tokenizer", None)
      if backend is not None:
        backend.save(os.path.join(local, "tokenizer.json"))
      files = {"vocab.json": vocab, "special_tokens_map.json": specials, "tokenizer_config.json": config}
      if added:
        files["added_tokens.json"] = added
      for name, content in files.items():
        with open(os.path.join(local, name), "w", encoding="utf-8") as f:
          json.dump(content, f, indent=2, ensure_ascii=False)
      with open(os.path.join(local, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def bpe_vocab_and_merges(hf_tokenizer, source: str = "tokenizer") -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
  """The BPE vocabulary (token -> id) and merges (in rank order) of a transformers CLIP tokenizer, fast
  (tokenizers-backed: read from its ``tokenizer.json`` model) or slow (``encoder`` and ``bpe_ranks``)."""
  backend = getattr(hf_tokenizer, "backend_tokenizer", None)
  if backend is not None:
    model = json.loads(backend.to_str())["model"]
    if model.get("type") != "BPE":
      raise ValueError(f"{source}: the tokenizer's model is {model.get('type')!r}, not the BPE of a CLIP "
                       "tokenizer; it cannot be written as vocab.json + merges.txt")
    merges = [tuple(m) if isinstance(m, (list, tuple)) else tuple(m.split(" ")) for m in model["merges"]]
    return dict(model["vocab"]), merges
  if hasattr(hf_tokenizer, "encoder") and hasattr(hf_tokenizer, "bpe_ranks"):
    ranks = hf_tokenizer.bpe_ranks
    return dict(hf_tokenizer.encoder), sorted(ranks, key=ranks.get)
  raise TypeError(f"{source}: {type(hf_tokenizer).__name__} is neither a tokenizers-backed nor a slow CLIP BPE "
                  "tokenizer")


def load_tokenizer(folder: str) -> Tokenizer:
  """Reads a transformers ``CLIPTokenizer`` folder (``vocab.json`` + ``merges.txt``, or ``tokenizer.json``), local
  or ``gs://``."""
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  if not storage.is_dir(folder):
    raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
  files = set(storage.listdir(folder))
  if not ({"vocab.json", "merges.txt"} <= files or "tokenizer.json" in files):
    raise FileNotFoundError(f"{folder} holds no CLIP tokenizer: expected vocab.json and merges.txt "
                            f"(or tokenizer.json), found {sorted(files)}")
  with storage.local_copy(folder) as local:
    hf = CLIPTokenizer.from_pretrained(local, local_files_only=True)
  return Tokenizer(hf, source=os.fspath(folder))


def _as_list(prompts: Union[str, Sequence[str]]) -> List[str]:
  if isinstance(prompts, str):
    prompts = [prompts]
  prompts = list(prompts)
  if not prompts:
    raise ValueError("no prompts given (an empty list)")
  for i, p in enumerate(prompts):
    if not isinstance(p, str):
      raise TypeError(f"prompt {i} is a {type(p).__name__}, not a string: {p!r}")
  return prompts
