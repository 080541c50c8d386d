"""The local-folder TFDS builders and data.prepare, on tiny inputs written by the tests.

Each prepared dataset is read back the way training reads it (``records.open_source``, then the raw
TFRecords through ``RecordSpec.parse_python``), so the tests check the whole path from input file to record.
Error cases mostly call the builders' reader functions directly: they are the same code without the TFDS
round trip.
"""
import importlib
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
from absl import flags
from PIL import Image

from sc_dpo_jax.data import builders, prepare as prepare_lib
from sc_dpo_jax.data.builders import duo_folder, pairs_table, pickapic, prompts
from sc_dpo_jax.data.builders._base import SourceError
from sc_dpo_jax.data.records import open_source
from sc_dpo_jax.data.schema import pair_spec, prompt_spec


def image_bytes(color, fmt="JPEG"):
  buf = io.BytesIO()
  Image.new("RGB", (8, 8), color).save(buf, format=fmt)
  return buf.getvalue()


def read_back(path):
  """The prepared dataset's source and its records by source_id, parsed as training parses them."""
  source = open_source(path)
  records = [source.spec.parse_python(raw.numpy()) for raw in tf.data.TFRecordDataset(source.files)]
  assert len(records) == source.total
  return source, {r["source_id"].decode(): r for r in records}


def stats_of(path):
  with open(os.path.join(path, prepare_lib.STATS_FILE)) as f:
    return json.load(f)


# -- pickapic -------------------------------------------------------------------------------------------------


def write_parquet(path, labels, *, ranking=True, drop=()):
  images = [(image_bytes((10 * i, 0, 0)), image_bytes((0, 10 * i, 0))) for i in range(len(labels))]
  columns = {"caption": [f"caption {i}" for i in range(len(labels))],
             "jpg_0": [a for a, _ in images], "jpg_1": [b for _, b in images], "label_0": labels,
             "best_image_uid": ["x"] * len(labels)}
  if ranking:
    columns["ranking_id"] = [1000 + i for i in range(len(labels))]
  for name in drop:
    del columns[name]
  pq.write_table(pa.table(columns), path, row_group_size=2)
  return images


def test_pickapic_drops_ties_and_puts_chosen_first(tmp_path):
  src = tmp_path / "pickapic"
  src.mkdir()
  images = write_parquet(src / "train-00000.parquet", [1.0, 0.0, 0.5, 1.0, 0.0])
  out = prepare_lib.prepare("pickapic", str(src), str(tmp_path / "tfds"))
  assert out == str(tmp_path / "tfds" / "pickapic" / "1.0.0")
  source, records = read_back(out)
  assert source.spec == pair_spec()
  assert sorted(records) == ["pickapic:1000", "pickapic:1001", "pickapic:1003", "pickapic:1004"]
  for i in (0, 1, 3, 4):
    record = records[f"pickapic:{1000 + i}"]
    chosen, rejected = images[i] if i in (0, 3) else images[i][::-1]   # label_0 == 0: image 1 is preferred
    assert record["image_chosen"] == chosen and record["image_rejected"] == rejected
    assert record["prompt"] == f"caption {i}".encode()
  stats = stats_of(out)
  assert (stats["rows_read"], stats["ties_dropped"], stats["swapped"], stats["pairs_written"]) == (5, 1, 2, 4)
  assert stats["num_examples"] == 4


def test_pickapic_reader_errors_and_ids(tmp_path):
  spec, path = pair_spec(), str(tmp_path / "a.parquet")
  write_parquet(path, [1.0, 0.0, 1.0], ranking=False)
  stats = {}
  keys = [key for key, _ in pickapic.read_pickapic([path], spec, stats, batch_size=2)]
  assert keys == ["a.parquet:0", "a.parquet:1", "a.parquet:2"]   # rows numbered across batches
  records = [r for _, r in pickapic.read_pickapic([path], spec, {})]
  assert [r["source_id"] for r in records] == [b"a.parquet:0", b"a.parquet:1", b"a.parquet:2"]

  write_parquet(path, [1.0, 0.0, 0.25])
  with pytest.raises(SourceError, match=r"a\.parquet row 2: label_0 = 0\.25"):
    list(pickapic.read_pickapic([path], spec, {}, batch_size=2))
  write_parquet(path, [1.0, None])
  with pytest.raises(SourceError, match=r"a\.parquet row 1: label_0 = None"):
    list(pickapic.read_pickapic([path], spec, {}))
  write_parquet(path, [1.0], drop=("jpg_1",))
  with pytest.raises(SourceError, match=r"a\.parquet: no column\(s\) \['jpg_1'\]"):
    list(pickapic.read_pickapic([path], spec, {}))
  for name in ("train-00000-of-00002-x.parquet", "validation-00000-of-00001-y.parquet"):
    write_parquet(tmp_path / name, [1.0])
  with pytest.raises(SourceError, match=r"shards of several splits \['train', 'validation'\]"):
    pickapic.parquet_files(str(tmp_path))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"empty: no \*\.parquet files"):
    pickapic.parquet_files(str(tmp_path / "empty"))


# -- pairs_table ----------------------------------------------------------------------------------------------


def write_images(folder, names):
  os.makedirs(folder, exist_ok=True)
  out = {}
  for i, name in enumerate(names):
    out[name] = image_bytes((20 * i, 100, 0), "PNG" if name.endswith(".png") else "JPEG")
    with open(os.path.join(folder, name), "wb") as f:
      f.write(out[name])
  return out


def test_pairs_table_jsonl_with_costs_and_harmful_flags(tmp_path):
  src = tmp_path / "scp"
  images = write_images(src / "img", ["c0.png", "r0.png", "c1.jpg", "r1.jpg"])
  rows = [
      {"prompt": "a harmful prompt", "chosen": "img/c0.png", "rejected": str(src / "img" / "r0.png"),
       "cost_chosen": 0.1, "cost_rejected": 2.5, "harmful": True, "id": "scp-0", "extra": 1},
      {"prompt": "a clean prompt", "chosen": "img/c1.jpg", "rejected": "img/r1.jpg",
       "cost_chosen": -1.0, "cost_rejected": "0.75", "harmful": "false"},
  ]
  (src / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
  out = prepare_lib.prepare("pairs_table", str(src), str(tmp_path / "tfds"))
  assert out.endswith(os.path.join("pairs_table", "costs_harmful", "1.0.0"))
  source, records = read_back(out)
  assert source.spec == pair_spec(has_costs=True, has_harmful_prompt=True)
  assert source.spec.fields == ("prompt", "source_id", "image_chosen", "image_rejected", "cost_chosen",
                                "cost_rejected", "harmful_prompt")
  first, second = records["scp-0"], records["pairs.jsonl:2"]
  assert first["image_chosen"] == images["c0.png"] and first["image_rejected"] == images["r0.png"]
  assert second["image_chosen"] == images["c1.jpg"] and second["image_rejected"] == images["r1.jpg"]
  assert first["prompt"] == b"a harmful prompt" and second["prompt"] == b"a clean prompt"
  assert (first["cost_chosen"], first["cost_rejected"], first["harmful_prompt"]) == pytest.approx((0.1, 2.5, 1))
  assert (second["cost_chosen"], second["cost_rejected"], second["harmful_prompt"]) == pytest.approx((-1, 0.75, 0))
  stats = stats_of(out)
  assert stats["config"] == "costs_harmful" and stats["harmful_prompts"] == 1 and stats["ignored_columns"] == ["extra"]

  # A named smaller config drops the optional columns (listed as ignored); a named unknown one is an error.
  out = prepare_lib.prepare("pairs_table", str(src / "pairs.jsonl"), str(tmp_path / "tfds"), config="plain")
  source, _ = read_back(out)
  assert source.spec == pair_spec()
  assert stats_of(out)["ignored_columns"] == ["cost_chosen", "cost_rejected", "extra", "harmful"]
  with pytest.raises(ValueError, match=r"no config 'cost'; choose one of \['plain', 'costs', 'harmful'"):
    prepare_lib.prepare("pairs_table", str(src), str(tmp_path / "tfds"), config="cost")
  with pytest.raises(FileExistsError, match="already prepared"):
    prepare_lib.prepare("pairs_table", str(src), str(tmp_path / "tfds"), config="plain")


def test_pairs_table_csv_without_costs(tmp_path):
  src = tmp_path / "csv"
  images = write_images(src, ["a.jpg", "b.jpg", "c.png"])
  (src / "pairs.csv").write_text('prompt,chosen,rejected,note\n"a, quoted\nprompt",a.jpg,b.jpg,x\n'
                                 'second,c.png,a.jpg,\n')
  out = prepare_lib.prepare("pairs_table", str(src), str(tmp_path / "tfds"))
  assert out.endswith(os.path.join("pairs_table", "plain", "1.0.0"))
  source, records = read_back(out)
  assert source.spec == pair_spec()
  assert sorted(records) == ["pairs.csv:2", "pairs.csv:4"]   # the quoted prompt spans lines 2-3
  assert records["pairs.csv:2"]["prompt"] == b"a, quoted\nprompt"
  assert records["pairs.csv:4"]["image_chosen"] == images["c.png"]
  assert records["pairs.csv:4"]["image_rejected"] == images["a.jpg"]


def test_pairs_table_errors(tmp_path):
  write_images(tmp_path, ["a.jpg", "b.jpg"])
  table = tmp_path / "pairs.jsonl"
  table.write_text(json.dumps({"prompt": "p", "chosen": "a.jpg", "rejected": "b.jpg"}) + "\n"
                   + json.dumps({"prompt": "q", "chosen": "a.jpg", "rejected": "missing.jpg"}) + "\n")
  # Through TFDS (prepare): the builder's error reaches the caller unchanged.
  with pytest.raises(FileNotFoundError, match=r"pairs\.jsonl:2: rejected image '.*missing\.jpg' does not exist"):
    prepare_lib.prepare("pairs_table", str(tmp_path), str(tmp_path / "tfds"))

  table.write_text(json.dumps({"prompt": "p", "chosen": "a.jpg", "rejected": "b.jpg"}) + "\n"
                   + json.dumps({"prompt": "q", "chosen": "a.jpg", "rejected": "b.jpg", "cost_chosen": 1,
                                 "cost_rejected": 2}) + "\n")
  with pytest.raises(SourceError, match=r"pairs\.jsonl:2: this row has costs .* but line 1 has no costs"):
    pairs_table.detect_columns(str(table))
  table.write_text(json.dumps({"prompt": "p", "chosen": "a.jpg", "rejected": "b.jpg", "cost_chosen": 1}) + "\n")
  with pytest.raises(SourceError, match=r"pairs\.jsonl:1: 'cost_chosen' is given but 'cost_rejected' is not"):
    pairs_table.detect_columns(str(table))
  table.write_text(json.dumps({"prompt": "p", "chosen": "a.jpg", "rejected": "b.jpg", "harmful": "maybe"}) + "\n")
  with pytest.raises(SourceError, match=r"pairs\.jsonl:1: 'harmful' = 'maybe' is not a boolean"):
    list(pairs_table.read_pairs_table(str(table), pair_spec(has_harmful_prompt=True), {}))
  table.write_text(json.dumps({"prompt": "p", "chosen": "a.jpg"}) + "\n")
  with pytest.raises(SourceError, match=r"pairs\.jsonl:1: no 'rejected'"):
    list(pairs_table.read_pairs_table(str(table), pair_spec(), {}))
  table.write_text(json.dumps({"prompt": "p", "chosen": "a.jpg", "rejected": "b.jpg"}) + "\n")
  with pytest.raises(SourceError, match=r"pairs\.jsonl:1: no 'cost_chosen'/'cost_rejected', which the config"):
    list(pairs_table.read_pairs_table(str(table), pair_spec(has_costs=True), {}))
  (tmp_path / "more.csv").write_text("prompt,chosen\n")
  with pytest.raises(SourceError, match=r"several pairs table files \['more\.csv', 'pairs\.jsonl'\]"):
    pairs_table.PairsTable.detect_config(str(tmp_path))
  with pytest.raises(SourceError, match=r"more\.csv: no column\(s\) \['rejected'\]"):
    pairs_table.PairsTable.detect_config(str(tmp_path), "more.csv")


# -- duo_folder -----------------------------------------------------------------------------------------------


def test_duo_folder_chosen_is_safe(tmp_path):
  src = tmp_path / "duo"
  safe = write_images(src / "safe", ["0.png", "1.png", "2.jpg"])
  unsafe = write_images(src / "unsafe", ["0.png", "1.jpg", "2.jpg"])
  (src / "safe" / ".DS_Store").write_bytes(b"\0")
  (src / "prompts.json").write_text(json.dumps({"0": "a prompt", "1": {"prompt": "another"}, "2": "third",
                                                "9": "no images"}))
  out = prepare_lib.prepare("duo_folder", str(src), str(tmp_path / "tfds"))
  _, records = read_back(out)
  assert sorted(records) == ["duo:0", "duo:1", "duo:2"]
  for stem, name_safe, name_unsafe in (("0", "0.png", "0.png"), ("1", "1.png", "1.jpg"), ("2", "2.jpg", "2.jpg")):
    assert records[f"duo:{stem}"]["image_chosen"] == safe[name_safe]
    assert records[f"duo:{stem}"]["image_rejected"] == unsafe[name_unsafe]
  assert records["duo:1"]["prompt"] == b"another"
  stats = stats_of(out)
  assert (stats["pairs_written"], stats["unused_prompts"], stats["ignored_files"]) == (3, 1, 1)

  write_images(src / "unsafe", ["3.png"])
  with pytest.raises(SourceError, match=r"unpaired image stem\(s\): '3' only in unsafe/"):
    list(duo_folder.read_duo_folder(str(src), pair_spec(), {}))
  write_images(src / "safe", ["3.png"])
  with pytest.raises(SourceError, match=r"prompts\.json: no prompt for image stem\(s\) \['3'\]"):
    list(duo_folder.read_duo_folder(str(src), pair_spec(), {}))


# -- prompts --------------------------------------------------------------------------------------------------


def test_prompts_i2p_csv(tmp_path):
  src = tmp_path / "i2p"
  src.mkdir()
  (src / "i2p_benchmark.csv").write_text(
      "prompt,categories,hard,inappropriate_percentage,sd_seed,sd_guidance_scale\n"
      '"a nude, painting","sexual,shocking",1,80.0,12345,7\n'
      "a fight,violence,0,40.0,,7.5\n"
      "a hat,,0,0.0,4294967295,\n")
  out = prepare_lib.prepare("prompts", str(src), str(tmp_path / "tfds"))
  source, records = read_back(out)
  assert source.spec == prompt_spec()
  assert [r["source_id"] for r in records.values()] == [b"i2p_benchmark.csv:2", b"i2p_benchmark.csv:3",
                                                         b"i2p_benchmark.csv:4"]   # file order kept
  first, second, third = records.values()
  assert (first["prompt"], first["categories"], first["seed"], first["guidance"]) == (
      b"a nude, painting", b"sexual,shocking", 12345, 7.0)
  assert (second["seed"], second["guidance"], second["negative_prompt"]) == (-1, 7.5, b"")
  assert (third["seed"], third["guidance"], third["categories"]) == (4294967295, -1.0, b"")
  stats = stats_of(out)
  assert (stats["prompts_written"], stats["missing_seed"], stats["missing_guidance"]) == (3, 1, 1)

  (src / "bad.csv").write_text("prompt,sd_seed\nok,1.5\n")
  with pytest.raises(SourceError, match=r"bad\.csv:2: 'sd_seed' = '1\.5' is not an integer"):
    list(prompts.read_prompts(str(src / "bad.csv"), prompt_spec(), {}))
  (src / "bad.csv").write_text("prompt,negative_prompt\nok,blurry\n,x\n")
  with pytest.raises(SourceError, match=r"bad\.csv:3: 'prompt' is empty"):
    list(prompts.read_prompts(str(src / "bad.csv"), prompt_spec(), {}))
  (src / "bad.csv").write_text("text\nok\n")
  with pytest.raises(SourceError, match=r"bad\.csv: no column\(s\) \['prompt'\]"):
    list(prompts.read_prompts(str(src / "bad.csv"), prompt_spec(), {}))


def test_prepare_cli_on_a_txt_prompt_list(tmp_path, capsys):
  src = tmp_path / "list"
  src.mkdir()
  (src / "prompts.txt").write_text("a red car\n\n  a blue house  \n")
  (src / "notes.md").write_text("not read")
  flag_values = flags.FlagValues()
  prepare_lib.define_flags(flag_values)
  flag_values(["prepare", "--builder=prompts", f"--source={src / 'prompts.txt'}", f"--data_dir={tmp_path / 'tfds'}"])
  prepare_lib.main(["prepare"], flag_values)
  out = capsys.readouterr().out.strip().splitlines()[-1]
  assert out == str(tmp_path / "tfds" / "prompts" / "1.0.0")
  _, records = read_back(out)
  assert {k: (r["prompt"], r["seed"], r["guidance"], r["categories"]) for k, r in records.items()} == {
      "prompts.txt:1": (b"a red car", -1, -1.0, b""), "prompts.txt:3": (b"a blue house", -1, -1.0, b"")}
  assert stats_of(out)["blank_lines_skipped"] == 1

  with pytest.raises(ValueError, match=r"unknown builder 'pickapik'; choose one of \['duo_folder', 'pairs_table'"):
    prepare_lib.prepare("pickapik", str(src), str(tmp_path / "tfds"))
  with pytest.raises(ValueError, match="builder 'prompts' has no configs"):
    prepare_lib.prepare("prompts", str(src), str(tmp_path / "tfds"), config="plain")
  with pytest.raises(FileNotFoundError, match="no such file or folder"):
    prepare_lib.prepare("prompts", str(src / "nothing"), str(tmp_path / "tfds"))


def test_modules_can_be_executed_again():
  """TFDS's global registry would refuse a second class named pickapic; ours are not registered there."""
  for module in (pickapic, pairs_table, duo_folder, prompts, builders):
    importlib.reload(module)
  assert set(builders.BUILDERS) == {"pickapic", "pairs_table", "duo_folder", "prompts"}
