"""The tf.data input pipeline: order, seeds, resume, host shards, decoding, bad records, global batches."""
import io
import json
import os
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from sc_dpo_jax.data import pipeline, records, schema
from sc_dpo_jax.data.schema import RecordError
from tests.subprocess_helper import run


def _png(array):
  out = io.BytesIO()
  Image.fromarray(array.astype(np.uint8)).save(out, format="PNG")
  return out.getvalue()


def _image_pair(i, size=(24, 20)):
  rng = np.random.default_rng(i)
  w, h = size
  return _png(rng.integers(0, 255, (h, w, 3))), _png(rng.integers(0, 255, (h, w, 3)))


def _pairs(n, **extra):
  out = []
  for i in range(n):
    chosen, rejected = _image_pair(i)
    out.append(dict(prompt=f"prompt {i}", source_id=f"id{i}", image_chosen=chosen, image_rejected=rejected,
                    **{k: v(i) for k, v in extra.items()}))
  return out


@pytest.fixture(scope="module")
def image_source(tmp_path_factory):
  """37 image pairs with costs in 4 shards of unequal size."""
  spec = schema.pair_spec(has_costs=True)
  recs = _pairs(37, cost_chosen=lambda i: 0.01 * i, cost_rejected=lambda i: 1.0 + i)
  return records.write_records(str(tmp_path_factory.mktemp("images")), spec, recs, num_shards=4)


LATENT_SPEC = schema.pair_spec(image_format="latent", latent_shape=(2, 3, 4), latent_scaling_factor=0.5,
                               latent_shift_factor=0.25, text_states_shape=(3, 5), has_harmful_prompt=True)


def _latent_record(i):
  mean = np.full((2, 3, 2), float(i), np.float32)
  logvar = np.full((2, 3, 2), np.log(4.0), np.float32)            # std 2
  return dict(prompt=f"prompt {i}", source_id=f"id{i}", moments_chosen=np.concatenate([mean, logvar], -1),
              moments_rejected=np.concatenate([-mean, logvar], -1), text_states=np.full((3, 5), i, np.float32),
              harmful_prompt=i % 2)


@pytest.fixture(scope="module")
def latent_source(tmp_path_factory):
  recs = [_latent_record(i) for i in range(50)]
  return records.write_records(str(tmp_path_factory.mktemp("latents")), LATENT_SPEC, recs, num_shards=3)


def _iterator(source, **kwargs):
  kwargs.setdefault("batch_size", 4)
  kwargs.setdefault("process_index", 0)
  kwargs.setdefault("process_count", 1)
  if source.spec.image_format == schema.IMAGE and source.spec.kind == schema.PAIR:
    kwargs.setdefault("resolution", 8)
  return pipeline.DataIterator(source, **kwargs)


def _ids(batches):
  return [list(b["source_id"]) for b in batches]


def test_order_is_a_function_of_the_seed_and_epochs_differ(latent_source):
  a = [next(it) for it in [_iterator(latent_source, seed=3)] for _ in range(25)]
  b = [next(it) for it in [_iterator(latent_source, seed=3)] for _ in range(25)]
  c = [next(it) for it in [_iterator(latent_source, seed=4)] for _ in range(25)]
  assert _ids(a) == _ids(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["latents_chosen"], y["latents_chosen"])   # same noise too
  assert _ids(a) != _ids(c)
  flat = sum(_ids(a), [])
  first, second = flat[:50], flat[50:100]      # 25 batches of 4 = two epochs of 50
  assert sorted(first) == sorted(second) == sorted(f"id{i}" for i in range(50))
  assert first != second                       # each epoch its own order
  unshuffled = sum(_ids([next(it) for it in [_iterator(latent_source, shuffle=False)] for _ in range(5)]), [])
  assert unshuffled == [f"id{i}" for i in range(20)]


def test_resume_gives_the_uninterrupted_batches_across_epochs(latent_source, tmp_path):
  import orbax.checkpoint as ocp
  full = _iterator(latent_source, seed=7, batch_size=6)
  expected = [next(full) for _ in range(20)]                # 120 records: two epoch boundaries
  for k in (3, 8, 16):
    first = _iterator(latent_source, seed=7, batch_size=6)
    for _ in range(k):
      next(first)
    state = first.state()
    with ocp.CheckpointManager(str(tmp_path / f"ckpt{k}")) as manager:
      manager.save(k, args=ocp.args.Composite(data=ocp.args.JsonSave(state)))
      manager.wait_until_finished()
      restored = manager.restore(k, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    resumed = _iterator(latent_source, seed=7, batch_size=6)
    resumed.restore(restored)
    for want in expected[k:k + 4]:
      got = next(resumed)
      assert list(got["source_id"]) == list(want["source_id"])
      np.testing.assert_array_equal(got["latents_chosen"], want["latents_chosen"])
  assert resumed.state()["batches"] == 16 + 4


def test_restore_refuses_a_state_of_other_settings(latent_source):
  state = _iterator(latent_source, seed=1).state()
  with pytest.raises(ValueError, match="seed=1"):
    _iterator(latent_source, seed=2).restore(state)
  with pytest.raises(ValueError, match="batch_size"):
    _iterator(latent_source, seed=1, batch_size=5).restore(state)


@pytest.mark.parametrize("process_count", [2, 3, 5])
def test_hosts_get_disjoint_shards_that_cover_the_dataset(image_source, process_count):
  # 4 files: whole files for 2 and 3 hosts, every 5th record of all files for 5 hosts.
  seen = []
  for p in range(process_count):
    it = _iterator(image_source, seed=0, num_epochs=1, drop_remainder=False, process_index=p,
                   process_count=process_count, batch_size=5)
    assert it.shard.record_level == (process_count > 4)
    ids = sum(_ids(list(it)), [])
    assert len(ids) == it.shard.records_per_epoch
    seen.append(ids)
  flat = sum(seen, [])
  assert len(flat) == len(set(flat)) == 37
  assert set(flat) == {f"id{i}" for i in range(37)}


def test_images_are_resized_cropped_and_flipped_together(tmp_path):
  # Left half black, right half white, 40x20: resized to 16x8 then the centre 8x8 is half black, half white.
  img = np.zeros((20, 40, 3), np.uint8)
  img[:, 20:] = 255
  recs = [dict(prompt="p", source_id=f"{i}", image_chosen=_png(img), image_rejected=_png(img)) for i in range(32)]
  source = records.write_records(str(tmp_path), schema.pair_spec(), recs)
  plain = next(_iterator(source, batch_size=32, resolution=8))["image_chosen"]
  assert plain.shape == (32, 8, 8, 3) and plain.dtype == np.uint8
  assert (plain[:, :, :3] == 0).all() and (plain[:, :, 5:] == 255).all()
  batch = next(_iterator(source, batch_size=32, resolution=8, random_flip=True, seed=0))
  np.testing.assert_array_equal(batch["image_chosen"], batch["image_rejected"])   # same flip for the pair
  flipped = batch["image_chosen"][:, 0, 0, 0] == 255
  assert 4 < flipped.sum() < 28                                                    # about half
  np.testing.assert_array_equal(batch["image_chosen"][flipped], plain[flipped][:, :, ::-1])


def test_latents_from_moments(latent_source):
  batch = next(_iterator(latent_source, latents="mean", shuffle=False))
  ids = np.array([int(s[2:]) for s in batch["source_id"]], np.float32)
  np.testing.assert_allclose(batch["latents_chosen"], (ids[:, None, None, None] - 0.25) * 0.5 * np.ones((1, 2, 3, 2)))
  np.testing.assert_allclose(batch["text_states"], ids[:, None, None] * np.ones((1, 3, 5)))
  np.testing.assert_array_equal(batch["harmful_prompt"], ids.astype(int) % 2)
  moments = next(_iterator(latent_source, latents="moments", shuffle=False))
  assert moments["moments_chosen"].shape == (4, 2, 3, 4) and "latents_chosen" not in moments
  # Sampled: (mean + 2 eps - 0.25) * 0.5 -> residual / (0.5 * 2) is standard normal.
  it = _iterator(latent_source, batch_size=50, shuffle=False)
  b = next(it)
  ids = np.array([int(s[2:]) for s in b["source_id"]], np.float32)[:, None, None, None]
  eps = (b["latents_chosen"] / 0.5 + 0.25 - ids) / 2.0
  eps_l = (b["latents_rejected"] / 0.5 + 0.25 + ids) / 2.0
  assert abs(eps.mean()) < 0.15 and abs(eps.std() - 1) < 0.1
  assert abs(np.corrcoef(eps.ravel(), eps_l.ravel())[0, 1]) < 0.15                 # independent noise


def _as_format_1(source, folder):
  """A copy of the dataset ``source`` as format ``sc_dpo_jax.records/1`` wrote it: the same records with the
  moments under their old feature names ``latent_chosen`` / ``latent_rejected``, and format 1 in the info."""
  import shutil
  import tensorflow as tf
  src = os.path.dirname(source.files[0])
  shutil.copytree(src, folder)
  for path in source.files:
    out = os.path.join(folder, os.path.basename(path))
    with tf.io.TFRecordWriter(out) as w:
      for raw in tf.data.TFRecordDataset(path):
        example = tf.train.Example.FromString(raw.numpy())
        feats = example.features.feature
        for which in ("chosen", "rejected"):
          feats[f"latent_{which}"].CopyFrom(feats[f"moments_{which}"])
          del feats[f"moments_{which}"]
        w.write(example.SerializeToString())
  info = records.read_info(folder)
  assert info["format"] == records.FORMAT == "sc_dpo_jax.records/2"
  info["format"] = "sc_dpo_jax.records/1"
  records.write_json_atomic(os.path.join(folder, records.INFO_FILE), info)
  return folder


def test_format_1_latent_datasets_read_as_the_current_format(latent_source, tmp_path, caplog):
  """Format 1 stored the moments as latent_chosen / latent_rejected: open_source maps them to moments_chosen /
  moments_rejected with one logged line, and every reader sees the same records as from format 2."""
  import logging
  import tensorflow as tf
  folder = _as_format_1(latent_source, str(tmp_path / "v1"))
  raw_old = [r.numpy() for f in sorted(os.listdir(folder)) if f.endswith(".tfrecord")
             for r in tf.data.TFRecordDataset(os.path.join(folder, f))]
  old_keys = set(tf.train.Example.FromString(raw_old[0]).features.feature)
  assert {"latent_chosen", "latent_rejected"} <= old_keys and not old_keys & {"moments_chosen", "moments_rejected"}
  raw_new = [r.numpy() for f in latent_source.files for r in tf.data.TFRecordDataset(f)]
  assert {"moments_chosen", "moments_rejected"} <= set(tf.train.Example.FromString(raw_new[0]).features.feature)

  with caplog.at_level(logging.INFO):
    old = records.open_source(folder)
  lines = [r.getMessage() for r in caplog.records if "latent_chosen" in r.getMessage()]
  assert len(lines) == 1 and "sc_dpo_jax.records/1" in lines[0] and "moments_chosen" in lines[0], lines
  assert old.spec == latent_source.spec and old.spec.to_json() == latent_source.spec.to_json()
  assert old.spec.stored_name("moments_chosen") == "latent_chosen" and old.spec.stored_name("prompt") == "prompt"
  assert list(old.num_records) == list(latent_source.num_records)

  for got, want in zip(raw_old, raw_new):                        # the slow path (explain_record's)
    a, b = old.spec.parse_python(got), latent_source.spec.parse_python(want)
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  for mode in ("sample", "mean", "moments"):                      # the graph path, noise included
    x, y = _iterator(old, seed=5, latents=mode), _iterator(latent_source, seed=5, latents=mode)
    for _ in range(3):
      a, b = next(x), next(y)
      assert a.keys() == b.keys() and {"latent_chosen", "latent_rejected"}.isdisjoint(a), mode
      for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{mode}: {key}")
  lat = _latent_record(0)
  short = _example(dict(prompt=b"p", source_id=b"s", latent_chosen=lat["moments_chosen"][:, :2].tobytes(),
                        latent_rejected=lat["moments_rejected"].tobytes(), text_states=lat["text_states"].tobytes(),
                        harmful_prompt=1))
  with pytest.raises(RecordError, match=r"'moments_chosen' \(stored as 'latent_chosen'\) has 64 bytes"):
    old.spec.parse_python(short)


def test_tokenizer_adds_input_ids(latent_source):
  batch = next(_iterator(latent_source, tokenizer=lambda prompts: [[len(p), 1] for p in prompts]))
  assert batch["input_ids"].shape == (4, 2)
  assert list(batch["input_ids"][:, 0]) == [len(p) for p in batch["prompt"]]


CHOSEN_SPEC = schema.pair_spec(has_costs=True, has_chosen_prompt=True)
LATENT_CHOSEN_SPEC = schema.pair_spec(image_format="latent", latent_shape=(2, 3, 4), latent_scaling_factor=0.5,
                                      text_states_shape=(3, 5), has_chosen_prompt=True)


def _chosen_prompt(i):
  return f"safe prompt {i}"


def test_chosen_prompts_round_trip_and_yield_input_ids_chosen(tmp_path):
  """A spec with has_chosen_prompt: its JSON says so, the records carry prompt_chosen (and, with text states,
  text_states_chosen) through writing, the slow and the graph reading path, and the tokenizer adds
  input_ids_chosen from it."""
  import tensorflow as tf
  recs = _pairs(10, cost_chosen=lambda i: 0.0, cost_rejected=lambda i: 1.0, prompt_chosen=_chosen_prompt)
  source = records.write_records(str(tmp_path / "images"), CHOSEN_SPEC, recs, num_shards=2)
  info = records.read_info(str(tmp_path / "images"))
  assert info["spec"]["has_chosen_prompt"] is True and source.spec == CHOSEN_SPEC
  assert schema.RecordSpec.from_json(CHOSEN_SPEC.to_json()) == CHOSEN_SPEC
  assert "prompt_chosen" in CHOSEN_SPEC.fields and "prompt_chosen" not in schema.pair_spec().fields
  raw = next(iter(tf.data.TFRecordDataset(source.files[0]))).numpy()
  assert CHOSEN_SPEC.parse_python(raw)["prompt_chosen"] == b"safe prompt 0"

  tokenizer = lambda prompts: [[len(p), sum(map(ord, p)) % 997] for p in prompts]
  batches = list(_iterator(source, batch_size=5, num_epochs=1, tokenizer=tokenizer, seed=3))
  assert sum(len(b["prompt"]) for b in batches) == 10
  for b in batches:
    ids = [int(s.removeprefix("id")) for s in b["source_id"]]
    assert list(b["prompt_chosen"]) == [_chosen_prompt(i) for i in ids]
    assert list(b["prompt"]) == [f"prompt {i}" for i in ids]
    np.testing.assert_array_equal(b["input_ids_chosen"], tokenizer(list(b["prompt_chosen"])))
    np.testing.assert_array_equal(b["input_ids"], tokenizer(list(b["prompt"])))
  no_tokenizer = next(_iterator(source, batch_size=5))
  assert "prompt_chosen" in no_tokenizer and "input_ids_chosen" not in no_tokenizer

  lat = [dict(_latent_record(i), prompt_chosen=_chosen_prompt(i), text_states_chosen=np.full((3, 5), -i, np.float32))
         for i in range(6)]
  for r in lat:
    del r["harmful_prompt"]
  latent = records.write_records(str(tmp_path / "latents"), LATENT_CHOSEN_SPEC, lat)
  assert set(LATENT_CHOSEN_SPEC.array_fields) == {"moments_chosen", "moments_rejected", "text_states",
                                                  "text_states_chosen"}
  batch = next(_iterator(latent, batch_size=6, shuffle=False))
  np.testing.assert_array_equal(batch["text_states_chosen"], -np.arange(6)[:, None, None] * np.ones((6, 3, 5)))
  np.testing.assert_array_equal(batch["text_states"], np.arange(6)[:, None, None] * np.ones((6, 3, 5)))
  assert list(batch["prompt_chosen"]) == [_chosen_prompt(i) for i in range(6)]


def test_datasets_written_before_the_chosen_prompt_flag_still_read(tmp_path):
  """A dataset_info.json whose spec has no has_chosen_prompt key (written before it existed) reads as a spec
  without chosen prompts; the batches have no prompt_chosen or input_ids_chosen."""
  recs = _pairs(8, cost_chosen=lambda i: 0.0, cost_rejected=lambda i: 1.0)
  folder = str(tmp_path / "old")
  records.write_records(folder, schema.pair_spec(has_costs=True), recs)
  info = records.read_info(folder)
  del info["spec"]["has_chosen_prompt"]
  records.write_json_atomic(os.path.join(folder, records.INFO_FILE), info)
  source = records.open_source(folder)
  assert source.spec == schema.pair_spec(has_costs=True) and not source.spec.has_chosen_prompt
  batch = next(_iterator(source, tokenizer=lambda prompts: [[len(p)] for p in prompts]))
  assert "input_ids" in batch and not {"prompt_chosen", "input_ids_chosen"} & set(batch)


def test_a_record_without_its_chosen_prompt_fails_naming_it(tmp_path):
  recs = _pairs(4, cost_chosen=lambda i: 0.0, cost_rejected=lambda i: 1.0, prompt_chosen=_chosen_prompt)
  del recs[2]["prompt_chosen"]
  with pytest.raises(RecordError, match=r"record 2: missing field\(s\) \['prompt_chosen'\]"):
    records.write_records(str(tmp_path / "w"), CHOSEN_SPEC, recs)
  with pytest.raises(RecordError, match=r"field\(s\) \['prompt_chosen'\] are not in the spec"):
    records.write_records(str(tmp_path / "x"), schema.pair_spec(), _pairs(2, prompt_chosen=_chosen_prompt))
  # Prompt records may carry their safe rewrite (the RL trainer's rewrite exploration); costs they cannot.
  assert "prompt_chosen" in schema.RecordSpec(kind=schema.PROMPT, has_chosen_prompt=True).string_fields
  assert "prompt_chosen" not in schema.prompt_spec().string_fields
  with pytest.raises(ValueError, match="prompt records have no images, latents, text states, costs"):
    schema.RecordSpec(kind=schema.PROMPT, has_costs=True)


def _corrupt(tmp_path, spec, good, bad, name):
  recs = list(good)
  writer = records.ShardWriter(str(tmp_path / name), spec, name="d", num_shards=1)
  import tensorflow as tf
  with tf.io.TFRecordWriter(writer.path(0)) as w:
    for i, r in enumerate(recs):
      w.write(bad if i == 3 else spec.serialize(r))
  return writer.finish([len(recs)])


def _example(features):
  import tensorflow as tf
  feats = {}
  for k, v in features.items():
    if isinstance(v, bytes):
      feats[k] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))
    elif isinstance(v, float):
      feats[k] = tf.train.Feature(float_list=tf.train.FloatList(value=[v]))
    else:
      feats[k] = tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))
  return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


def _bad_cases():
  chosen, rejected = _image_pair(0)
  image_fields = dict(prompt=b"p", source_id=b"s", image_chosen=chosen, image_rejected=rejected)
  lat = _latent_record(0)
  latent_fields = dict(prompt=b"p", source_id=b"s", moments_chosen=lat["moments_chosen"].tobytes(),
                       moments_rejected=lat["moments_rejected"].tobytes(), text_states=lat["text_states"].tobytes(),
                       harmful_prompt=1)
  nan = lat["moments_rejected"].copy()
  nan[0, 0, 0] = np.nan
  return {
      "undecodable": ("image", {**image_fields, "image_rejected": b"\xff\xd8 not a jpeg"},
                      "'image_rejected' is not a decodable image"),
      "missing": ("image", {k: v for k, v in image_fields.items() if k != "prompt"}, "missing field 'prompt'"),
      "shape": ("latent", {**latent_fields, "moments_chosen": lat["moments_chosen"][:, :2].tobytes()},
                "'moments_chosen' has 64 bytes; shape (2, 3, 4) of float32 needs 96"),
      "nonfinite": ("latent", {**latent_fields, "moments_rejected": nan.tobytes()},
                    "'moments_rejected' has non-finite"),
      "cost": ("cost", {**image_fields, "cost_chosen": float("inf"), "cost_rejected": 1.0}, "'cost_chosen' = inf"),
      "type": ("cost", {**image_fields, "cost_chosen": 3, "cost_rejected": 1.0}, "'cost_chosen' is a int64_list"),
      "chosen_prompt": ("chosen", {**image_fields, "cost_chosen": 0.0, "cost_rejected": 1.0},
                        "missing field 'prompt_chosen'"),
  }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_records_name_file_index_and_reason_or_are_counted(tmp_path, case):
  kind, features, message = _bad_cases()[case]
  if kind == "latent":
    spec, good = LATENT_SPEC, [_latent_record(i) for i in range(10)]
  elif kind == "cost":
    spec = schema.pair_spec(has_costs=True)
    good = _pairs(10, cost_chosen=lambda i: 0.0, cost_rejected=lambda i: 1.0)
  elif kind == "chosen":
    spec = CHOSEN_SPEC
    good = _pairs(10, cost_chosen=lambda i: 0.0, cost_rejected=lambda i: 1.0, prompt_chosen=_chosen_prompt)
  else:
    spec, good = schema.pair_spec(), _pairs(10)
  source = _corrupt(tmp_path, spec, good, _example(features), case)
  with pytest.raises(RecordError) as info:
    list(_iterator(source, num_epochs=1, drop_remainder=False, batch_size=3))
  text = str(info.value)
  assert source.files[0] in text and "record 3:" in text and message in text, text
  it = _iterator(source, num_epochs=1, drop_remainder=False, batch_size=3, skip_bad_records=True)
  ids = sum(_ids(list(it)), [])
  assert len(ids) == 9 and "id3" not in ids
  assert it.bad_records == 1 and it.metrics()["data/bad_records"] == 1 and it.state()["bad_records"] == 1


def test_skipped_records_are_counted_over_epochs_and_resume(tmp_path):
  spec = schema.pair_spec()
  recs = _pairs(12)
  recs[4]["image_chosen"] = b"garbage"
  recs[9]["image_rejected"] = b"\x89PNG truncated"
  source = records.write_records(str(tmp_path), spec, recs, num_shards=2)
  it = _iterator(source, batch_size=5, skip_bad_records=True, seed=2)
  batches = [next(it) for _ in range(8)]                      # 40 good records = 4 epochs of 10
  assert it.bad_records in (7, 8)                             # 8 bad records read, minus any not yet reached
  again = _iterator(source, batch_size=5, skip_bad_records=True, seed=2)
  for _ in range(3):
    next(again)
  state = json.loads(json.dumps(again.state()))
  resumed = _iterator(source, batch_size=5, skip_bad_records=True, seed=2)
  resumed.restore(state)
  assert _ids([next(resumed) for _ in range(5)]) == _ids(batches[3:])
  assert resumed.bad_records == it.bad_records


def test_global_batch_on_eight_simulated_devices():
  """Two 'hosts' of batches become one global array split over data x fsdp (one process, 8 CPU devices)."""
  script = textwrap.dedent("""
      import numpy as np, jax
      from jax.sharding import Mesh
      from sc_dpo_jax.data import device
      mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
      batch = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3), "prompt": np.array(["a"] * 16, object)}
      out = device.global_batch(batch, mesh)
      assert set(out) == {"x"}, out.keys()
      x = out["x"]
      assert x.shape == (16, 3) and x.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
      assert sorted(s.data.shape[0] for s in x.addressable_shards) == [2] * 8
      np.testing.assert_array_equal(np.asarray(x), batch["x"])
      try:
        device.global_batch({"x": np.zeros((12, 3))}, mesh)
      except ValueError as e:
        assert "not divisible by the 8 data shards" in str(e), e
      else:
        raise AssertionError("12 rows over 8 shards must fail")
      print("ok")
      """)
  result = run([sys.executable, "-c", script], env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
               timeout=120)
  assert "ok" in result.stdout, result.stdout[-3000:]
