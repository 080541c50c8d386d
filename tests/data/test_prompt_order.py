"""A prompt set written in order (harmful prompts first, as the toy demo writes its RL set) must reach the RL
trainer shuffled: every iteration a fair mix, not harmful prompts first and clean ones last.

The bug this guards against: the RL config read its prompts through a 64-record shuffle buffer, so a file of 64
harmful then 64 clean prompts gave 8, 7, 7, 7, 5, 3, ... harmful prompts per batch of 8, and the reward curve
showed the prompt order, not learning. ``shuffle_buffer = 0`` (a full permutation of each epoch) is the RL
default now.
"""
import numpy as np

from sc_dpo_jax.configs.shielddiff_rl import rl_config
from sc_dpo_jax.configs.toy import toy_config
from sc_dpo_jax.data import curate, records
from sc_dpo_jax.data.pipeline import DataIterator

HARMFUL, CLEAN, BATCH = 64, 64, 8


def _harmful_per_batch(folder, shuffle_buffer, seed=0, epochs=1):
  it = DataIterator(records.open_source(folder), batch_size=BATCH, seed=seed, shuffle_buffer=shuffle_buffer,
                    process_index=0, process_count=1)
  counts = []
  for _ in range(epochs * (HARMFUL + CLEAN) // BATCH):
    batch = next(it)
    counts.append(sum(c.decode() == "unsafe" if isinstance(c, bytes) else c == "unsafe"
                      for c in batch["categories"]))
  return np.array(counts)


def test_a_harmful_first_prompt_file_gives_mixed_batches(tmp_path):
  folder = str(tmp_path / "prompts")
  curate.write_prompts(folder, [f"a red shape {i}" for i in range(HARMFUL)] + [f"a blue shape {i}" for i in
                                                                               range(CLEAN)],
                       categories=["unsafe"] * HARMFUL + [""] * CLEAN)
  assert rl_config("tiny").data.shuffle_buffer == rl_config("sd15").data.shuffle_buffer == 0
  assert toy_config().shielddiff_rl.data.shuffle_buffer == 0
  for seed in (0, 1, 2):
    counts = _harmful_per_batch(folder, shuffle_buffer=0, seed=seed, epochs=2)
    epoch = counts[:16]
    assert epoch.sum() == HARMFUL                       # every prompt once per epoch
    # A uniform permutation: the first half of the epoch holds 32 +- 2.9 harmful prompts (hypergeometric);
    # the old order put 52 there. No batch all harmful or all clean in a row of three.
    assert 22 <= epoch[:8].sum() <= 42, epoch
    assert not any(set(counts[i:i + 3]) <= {0} or set(counts[i:i + 3]) <= {BATCH} for i in range(len(counts) - 2))
    assert not np.array_equal(counts[:16], counts[16:])   # each epoch its own order
  # The old setting, for the record: a 64-record buffer leaves the file's order (here 8, 7, 7, 7, 5, 3, 5, 3,
  # 1, 1, ...: 45 of the 64 harmful prompts in the first half of the epoch).
  old = _harmful_per_batch(folder, shuffle_buffer=64)
  assert old[:8].sum() >= 44 and old[8:].sum() <= 20, old
