"""Exported tokenizer folders load in every transformers version ``setup.py`` allows, with our token ids.

``Tokenizer.save`` (used by ``models.save_pipeline``, hence by the trainers' export) writes ``tokenizer.json`` and
the slow tokenizer's ``vocab.json`` + ``merges.txt``. Here each exported folder is loaded with ``CLIPTokenizer``
(slow) and ``CLIPTokenizerFast`` of the installed transformers 5 and of transformers 4.46.3 (the oldest allowed,
installed once under ``.venv/transformers-4.46`` by ``tests.models.old_transformers``, run in a subprocess), and the
ids of a set of prompts, padded as diffusers pads them, must equal ours. Tokenizers:

* ``char``: the tiny pipeline's (``models.tiny``): single characters, no merges;
* ``toy_word``: the toy world's word tokenizer (``toy.tokenizer``): a BPE whose merges make each word one token;
* ``sd1_layout`` / ``sd2_layout``: a BPE laid out like Stable Diffusion's CLIP tokenizer (the 256 byte symbols, the
  same with ``</w>``, merges, then ``<|startoftext|>`` and ``<|endoftext|>`` last; 77 tokens), padded with
  ``<|endoftext|>`` (SD1) or ``!`` (SD2);
* ``toy_added``: the word tokenizer with a token added on top of its vocabulary (as textual inversion adds one);
* ``toy_export``: the ``tokenizer/`` of ``save_pipeline`` applied to the shipped toy base pipeline.
"""
import json
import os
import shutil

import numpy as np
import pytest

from sc_dpo_jax import models
from sc_dpo_jax.models.tiny import char_tokenizer
from sc_dpo_jax.models.tokenizer import Tokenizer
from sc_dpo_jax.toy import pretrain as toy_pretrain
from sc_dpo_jax.toy import tokenizer as toy_tokenizer
from tests.models import old_transformers

PROMPTS = [
    "a photo of a cat",
    "A Large RUBY circle, top-left!",
    "",
    "an apple on a stop sign",
    "crimson square's corner - 42",
    "x" * 40,                                   # longer than 16 tokens: truncated, still ends in EOS
    "two  spaces\tand\na newline",
    "unknown café word",                        # characters outside the toy vocabularies
    "a <cat-toy> circle",                       # toy_added's added token; spelt out (or unknown) by the others
    "a small scarlet triangle at the bottom right of a grey picture, drawn large and then small again, twice",
]
SD_WORDS = ["a", "photo", "of", "cat", "large", "ruby", "circle", "apple", "on", "stop", "sign", "crimson",
            "square", "corner", "top", "left", "small", "scarlet", "triangle", "bottom", "right", "grey"]


def _byte_symbols():
  """The 256 printable symbols a byte-level BPE writes bytes as, in byte order: printable Latin-1 bytes stand for
  themselves, the rest (controls, space, ...) for the code points from 256 upwards."""
  keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
  symbols, extra = [], 0
  for b in range(256):
    if b in keep:
      symbols.append(chr(b))
    else:
      symbols.append(chr(256 + extra))
      extra += 1
  return symbols


def _sd_layout_tokenizer(pad_token):
  from transformers import CLIPTokenizer
  symbols = _byte_symbols()
  vocab = {}
  for s in symbols + [s + "</w>" for s in symbols]:
    vocab[s] = len(vocab)
  merges = toy_tokenizer.learn_merges(SD_WORDS)
  for a, b in merges:
    vocab.setdefault(a + b, len(vocab))
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  return Tokenizer(CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token=pad_token),
                   source=f"sd_layout(pad={pad_token})")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """{name: (our Tokenizer, exported folder)}."""
  root = tmp_path_factory.mktemp("tokenizers")
  tokenizers = {"char": char_tokenizer(), "toy_word": toy_tokenizer.word_tokenizer(),
                "toy_added": toy_tokenizer.word_tokenizer(),
                "sd1_layout": _sd_layout_tokenizer("<|endoftext|>"), "sd2_layout": _sd_layout_tokenizer("!")}
  tokenizers["toy_added"].hf.add_tokens(["<cat-toy>"])
  out = {}
  for name, tok in tokenizers.items():
    tok.save(str(root / name))
    out[name] = (tok, str(root / name))
  pipe = models.load_pipeline(os.path.join(toy_pretrain.pretrained_folder(), "pipeline"))
  models.save_pipeline(str(root / "toy_export"), pipe)
  out["toy_export"] = (pipe.tokenizer, str(root / "toy_export" / "tokenizer"))
  return out


def _ours(tok):
  return tok(PROMPTS).tolist()


def test_slow_files_are_the_bpe_of_tokenizer_json(exported):
  for name, (tok, folder) in exported.items():
    files = set(os.listdir(folder))
    assert {"tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json",
            "tokenizer_config.json"} <= files, (name, files)
    with open(os.path.join(folder, "tokenizer.json")) as f:
      model = json.load(f)["model"]
    with open(os.path.join(folder, "vocab.json")) as f:
      assert json.load(f) == model["vocab"], name
    with open(os.path.join(folder, "merges.txt")) as f:
      lines = f.read().splitlines()
    assert lines[0].startswith("#version") and lines[1:] == [" ".join(m) for m in model["merges"]], name
    with open(os.path.join(folder, "tokenizer_config.json")) as f:
      config = json.load(f)
    assert config["tokenizer_class"] == "CLIPTokenizer" and config["model_max_length"] == tok.max_length
    assert config["pad_token"] == tok.hf.pad_token
  assert len(exported["toy_word"][0].hf.get_vocab()) > 200     # the toy's merges made it (not only characters)
  with open(os.path.join(exported["toy_added"][1], "added_tokens.json")) as f:
    assert json.load(f) == {"<cat-toy>": len(exported["toy_word"][0].hf.get_vocab())}
  assert exported["toy_added"][0](["a <cat-toy>"])[0, 2] == len(exported["toy_word"][0].hf.get_vocab())


def test_transformers_5_slow_and_fast_give_our_ids(exported, tmp_path):
  from transformers import CLIPTokenizer, CLIPTokenizerFast
  for name, (tok, folder) in exported.items():
    slow_only = tmp_path / name                # the slow files alone must give the same tokenizer
    shutil.copytree(folder, slow_only)
    os.remove(slow_only / "tokenizer.json")
    for cls in (CLIPTokenizer, CLIPTokenizerFast):
      for source in (folder, str(slow_only)):
        hf = cls.from_pretrained(source, local_files_only=True)
        ids = hf(PROMPTS, padding="max_length", max_length=hf.model_max_length, truncation=True)["input_ids"]
        assert ids == _ours(tok), (name, cls.__name__, source)
    np.testing.assert_array_equal(models.load_tokenizer(folder)(PROMPTS), tok(PROMPTS))


def test_transformers_4_46_slow_and_fast_give_our_ids(exported):
  names = sorted(exported)
  got = old_transformers.tokenize_with_old([exported[n][1] for n in names], PROMPTS)
  for name in names:
    tok, folder = exported[name]
    for cls in ("CLIPTokenizer", "CLIPTokenizerFast"):
      result = got[folder][cls]
      assert result["model_max_length"] == tok.max_length, (name, cls)
      assert result["pad_token"] == tok.hf.pad_token, (name, cls)
      assert old_transformers.as_lists(result["ids"]) == _ours(tok), (name, cls)
