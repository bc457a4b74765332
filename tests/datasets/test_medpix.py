"""medpix_dataset / medpix_sample_dataset: sources, case split, metadata, bad rows; the shipped sample."""

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import mistral_common
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import load_dataset
from PIL import Image
from torchtune_mistral3.data import collate_for_dataset, padded_collate_mistral3, padded_collate_packed_mistral3
from torchtune_mistral3.datasets import (
    MEDPIX_SAMPLE_DIR,
    _medpix,
    medpix_dataset,
    medpix_sample_dataset,
    pack_first_fit,
    validation_cases,
)
from torchtune_mistral3.models.mistral3._transform import mistral3_transform

TEKKEN = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
REPO = Path(__file__).resolve().parents[2]
COLUMNS = ["image_id", "mode", "case_id", "question", "answer"]


@pytest.fixture(scope="module")
def transform():
    return mistral3_transform(str(TEKKEN), max_seq_len=2048, max_image_size=224)


def _sample_table() -> pa.Table:
    """Both shipped parquet files as one Arrow table (keeps the HF ``Image`` feature metadata)."""
    return pa.concat_tables([pq.read_table(MEDPIX_SAMPLE_DIR / f"{s}.parquet") for s in ("train", "validation")])


def _write(table: pa.Table, path: Path) -> str:
    pq.write_table(table, path)
    return str(path)


def _sample_rows(split: str):
    return pq.read_table(MEDPIX_SAMPLE_DIR / f"{split}.parquet").to_pylist()


def _set(table: pa.Table, column: str, row: int, value) -> pa.Table:
    values = table.column(column).to_pylist()
    values[row] = value
    index = table.schema.get_field_index(column)
    return table.set_column(index, table.schema.field(index), pa.array(values, type=table.schema.field(index).type))


def test_shipped_sample(transform):
    train, val = medpix_sample_dataset(transform), medpix_sample_dataset(transform, split="validation")
    assert (len(train), len(val)) == (24, 9)
    for split in ("train", "validation"):
        assert pq.read_schema(MEDPIX_SAMPLE_DIR / f"{split}.parquet").names == COLUMNS
    rows = _sample_table().to_pylist()
    cases = {}
    for r in rows:
        cases.setdefault(r["case_id"], []).append(r)
    assert len(cases) >= 6 and all(len(v) >= 2 for v in cases.values())
    assert {r["mode"] for r in rows} == {"CT", "MR", "CR", "NM", "US"}
    image_modes = {Image.open(io.BytesIO(r["image_id"]["bytes"])).mode for r in rows}
    assert {"I;16", "L", "RGB", "P"} <= image_modes
    assert not {train[i]["case_id"] for i in range(len(train))} & {val[i]["case_id"] for i in range(len(val))}
    total_bytes = sum((MEDPIX_SAMPLE_DIR / f"{s}.parquet").stat().st_size for s in ("train", "validation"))
    assert total_bytes < 4_000_000
    for ds in (train, val):
        for i in range(len(ds)):
            s = ds[i]
            assert set(s) == {"tokens", "mask", "labels", "encoder_input", "mode", "case_id"}
            answer = [t for t, lab in zip(s["tokens"], s["labels"]) if lab != -100]
            assert answer[-1] == 2 and transform.decode(answer) == ds._data[i]["answer"]
    batch = padded_collate_mistral3([train[0], train[1], val[0]])
    assert batch["encoder_input"]["image"]["images_per_sample"].tolist() == [1, 1, 1]


def test_sample_build_script_reproduces_the_shipped_sample(tmp_path):
    pytest.importorskip("data_store", reason="pydicom-data is needed to rebuild the sample")
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_medpix_sample.py"), "--out", str(tmp_path)],
        check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO / "plugin")},
    )
    for split in ("train", "validation"):
        ours, shipped = (pq.read_table(d / f"{split}.parquet").to_pylist() for d in (tmp_path, MEDPIX_SAMPLE_DIR))
        assert len(ours) == len(shipped)
        for a, b in zip(ours, shipped):
            assert [a[k] for k in COLUMNS[1:]] == [b[k] for k in COLUMNS[1:]]
            ia, ib = (Image.open(io.BytesIO(r["image_id"]["bytes"])) for r in (a, b))
            assert ia.mode == ib.mode and np.array_equal(np.asarray(ia), np.asarray(ib))


def test_single_file_is_split_by_case_without_leakage(transform, tmp_path):
    table = _sample_table()
    path = _write(table, tmp_path / "all.parquet")
    train = medpix_dataset(transform, source="parquet", data_files=path, split="train")
    val = medpix_dataset(transform, source="parquet", data_files=path, split="validation")
    train_cases, val_cases = set(train._data["case_id"]), set(val._data["case_id"])
    all_cases = set(table.column("case_id").to_pylist())
    assert not train_cases & val_cases and train_cases | val_cases == all_cases
    assert len(train) + len(val) == table.num_rows
    assert len(val_cases) == round(0.15 * len(all_cases))
    # deterministic, and independent of the row order of the source
    shuffled = _write(table.take(np.random.default_rng(1).permutation(table.num_rows)), tmp_path / "shuf.parquet")
    again = medpix_dataset(transform, source="parquet", data_files=shuffled, split="validation")
    assert set(again._data["case_id"]) == val_cases
    other_seed = medpix_dataset(transform, source="parquet", data_files=path, split="validation", split_seed=3)
    assert not set(other_seed._data["case_id"]) & set(
        medpix_dataset(transform, source="parquet", data_files=path, split="train", split_seed=3)._data["case_id"]
    )


def test_validation_cases_rule():
    ids = [f"case{i}" for i in range(20)]
    chosen = validation_cases(ids * 3, 0.25)
    assert len(chosen) == 5 and chosen == validation_cases(list(reversed(ids)), 0.25)
    assert validation_cases(ids, 0.0) == set() and len(validation_cases(["a", "b"], 0.9)) == 1
    with pytest.raises(ValueError, match="val_fraction"):
        validation_cases(ids, 1.0)


def _images_equal(a, b):
    return all(x.equal(y) for x, y in zip(a["encoder_input"]["image"]["images"], b["encoder_input"]["image"]["images"]))


def test_json_with_image_paths_and_torchtune_column_names(transform, tmp_path):
    rows = pq.read_table(MEDPIX_SAMPLE_DIR / "train.parquet").to_pylist()[:4]
    (tmp_path / "imgs").mkdir()
    with open(tmp_path / "data.jsonl", "w") as f:
        for i, r in enumerate(rows):
            (tmp_path / "imgs" / f"{i}.png").write_bytes(r["image_id"]["bytes"])
            f.write(json.dumps({"picture": f"imgs/{i}.png", "input": r["question"], "output": r["answer"],
                                "case_id": r["case_id"], "mode": r["mode"]}) + "\n")
    ds = medpix_dataset(
        transform, source="json", data_files=str(tmp_path / "data.jsonl"), image_dir=str(tmp_path),
        column_map={"image": "picture", "input": "input", "output": "output"}, split_by_case=False,
    )
    reference = medpix_sample_dataset(transform)
    assert len(ds) == 4
    for i in range(4):
        assert ds[i]["tokens"] == reference[i]["tokens"] and _images_equal(ds[i], reference[i])
        assert ds[i]["mode"] == rows[i]["mode"]


def test_image_folder_and_arrow_sources(transform, tmp_path):
    rows = pq.read_table(MEDPIX_SAMPLE_DIR / "train.parquet").to_pylist()[:3]
    folder = tmp_path / "folder"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as f:
        for i, r in enumerate(rows):
            (folder / f"{i}.png").write_bytes(r["image_id"]["bytes"])
            f.write(json.dumps({"file_name": f"{i}.png", "question": r["question"], "answer": r["answer"]}) + "\n")
    from_folder = medpix_dataset(transform, source="imagefolder", data_dir=str(folder),
                                 column_map={"image_id": "image"}, split_by_case=False)
    table = pa.table({
        "image_id": pa.array([{"bytes": r["image_id"]["bytes"], "path": None} for r in rows]),
        "question": [r["question"] for r in rows], "answer": [r["answer"] for r in rows],
    })
    with pa.OSFile(str(tmp_path / "data.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    from_arrow = medpix_dataset(transform, source="arrow", data_files=str(tmp_path / "data.arrow"),
                                split_by_case=False)
    reference = medpix_sample_dataset(transform)
    for ds in (from_folder, from_arrow):
        assert len(ds) == 3
        for i in range(3):
            assert ds[i]["tokens"] == reference[i]["tokens"] and _images_equal(ds[i], reference[i])
            assert ds[i]["mode"] is None


def test_hub_source_uses_its_own_splits_and_slices(transform, monkeypatch):
    calls = []
    files = {s: str(MEDPIX_SAMPLE_DIR / f"{s}.parquet") for s in ("train", "validation")}

    def fake_load_dataset(source, **kwargs):  # stands in for the 3 GB download
        calls.append((source, kwargs))
        return load_dataset("parquet", data_files=files)

    monkeypatch.setattr(_medpix, "load_dataset", fake_load_dataset)
    val = medpix_dataset(transform, split="validation")
    assert calls[0][0] == "mmoukouba/MedPix-VQA" and len(val) == 9
    assert len(medpix_dataset(transform, split="train[:5]")) == 5
    assert medpix_dataset(transform, split="train[-2:]")._data["__medpix_row__"] == [22, 23]
    resplit = medpix_dataset(transform, split="validation", split_by_case=True, val_fraction=0.5)
    assert len(set(resplit._data["case_id"])) == 6
    with pytest.raises(ValueError, match="no split 'test'"):
        medpix_dataset(transform, split="test", split_by_case=False)


def test_bad_rows_raise_naming_row_and_column_or_are_skipped(transform, tmp_path, caplog):
    table = _set(pq.read_table(MEDPIX_SAMPLE_DIR / "train.parquet"), "answer", 3, "  ")
    path = _write(table, tmp_path / "empty_answer.parquet")
    with pytest.raises(ValueError, match=r"split 'train' row 3: column 'answer' is empty"):
        medpix_dataset(transform, source="parquet", data_files=path, split_by_case=False)
    with caplog.at_level(logging.WARNING):
        ds = medpix_dataset(transform, source="parquet", data_files=path, split_by_case=False, skip_bad_rows=True)
    assert len(ds) == 23 and "skipped 1 bad row(s)" in caplog.text
    assert 3 not in ds._data["__medpix_row__"]

    # not an image at all: found when the dataset is built (the length check opens every header)
    table = _set(pq.read_table(MEDPIX_SAMPLE_DIR / "train.parquet"), "image_id", 5, {"bytes": b"no png", "path": None})
    path = _write(table, tmp_path / "bad_image.parquet")
    with pytest.raises(ValueError, match=r"row 5: column 'image_id': cannot decode the image"):
        medpix_dataset(transform, source="parquet", data_files=path, split_by_case=False)
    ds = medpix_dataset(transform, source="parquet", data_files=path, split_by_case=False, skip_bad_rows=True)
    assert len(ds) == 23 and 5 not in ds._data["__medpix_row__"]

    # a truncated image (its header is intact): found when the row is read, or skipped with skip_bad_rows
    png = pq.read_table(MEDPIX_SAMPLE_DIR / "train.parquet").column("image_id").to_pylist()[6]["bytes"]
    table = _set(pq.read_table(MEDPIX_SAMPLE_DIR / "train.parquet"), "image_id", 6, {"bytes": png[: len(png) // 2],
                                                                                      "path": None})
    path = _write(table, tmp_path / "truncated_image.parquet")
    ds = medpix_dataset(transform, source="parquet", data_files=path, split_by_case=False)
    with pytest.raises(ValueError, match=r"row 6: column 'image_id': cannot decode the image: OSError"):
        ds[6]
    ds = medpix_dataset(transform, source="parquet", data_files=path, split_by_case=False, skip_bad_rows=True)
    assert len(ds) == 23 and 6 not in ds._data["__medpix_row__"]

    table = _set(pq.read_table(MEDPIX_SAMPLE_DIR / "train.parquet"), "image_id", 7, None)
    path = _write(table, tmp_path / "null_image.parquet")
    with pytest.raises(ValueError, match=r"row 7: column 'image_id' is empty"):
        medpix_dataset(transform, source="parquet", data_files=path, split_by_case=False)

    path = _write(pq.read_table(MEDPIX_SAMPLE_DIR / "train.parquet").drop(["answer"]), tmp_path / "no_answer.parquet")
    with pytest.raises(ValueError, match=r"no column\(s\) \['answer'\]"):
        medpix_dataset(transform, source="parquet", data_files=path, split_by_case=False)


def test_row_ids_survive_filtering(transform, tmp_path):
    table = _set(pq.read_table(MEDPIX_SAMPLE_DIR / "train.parquet"), "image_id", 20, {"bytes": b"xx", "path": None})
    path = _write(table, tmp_path / "t.parquet")
    modes = table.column("mode").to_pylist()
    with pytest.raises(ValueError, match="row 20:"):
        medpix_dataset(transform, source="parquet", data_files=path, split_by_case=False,
                       filter_fn=lambda row: row["mode"] == modes[20])
    ds = medpix_dataset(transform, source="parquet", data_files=path, split_by_case=False,
                        filter_fn=lambda row: row["mode"] == modes[20], check_lengths=False)
    assert len(ds) == modes.count(modes[20])
    bad = ds._data["__medpix_row__"].index(20)
    with pytest.raises(ValueError, match="row 20:"):
        ds[bad]


def test_split_by_case_needs_case_id(transform, tmp_path):
    path = _write(pq.read_table(MEDPIX_SAMPLE_DIR / "train.parquet").drop(["case_id"]), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match="case_id is needed"):
        medpix_dataset(transform, source="parquet", data_files=path, split="validation")


def test_single_dataset_source_counts_as_train(transform, monkeypatch):
    # a source returning a single Dataset (e.g. load_dataset with split) is treated as its 'train' split
    single = load_dataset("parquet", data_files=str(MEDPIX_SAMPLE_DIR / "validation.parquet"), split="train")
    monkeypatch.setattr(_medpix, "load_dataset", lambda source, **kw: single)
    ds = medpix_dataset(transform, source="x", split="train", split_by_case=False)
    assert len(ds) == 9 and ds._data["__medpix_split__"][0] == "train"


def _answer_start(sample):
    return sample["mask"].index(False)


def test_too_long_rows_are_found_when_the_dataset_is_built(tmp_path, caplog):
    # reference: the rows that fail when read, as they did mid-run before the check (full pixel transform)
    starts = [_answer_start(s) for s in (lambda ds: [ds[i] for i in range(len(ds))])(
        medpix_sample_dataset(mistral3_transform(str(TEKKEN), max_seq_len=None, max_image_size=224)))]
    max_seq_len = sorted(starts)[len(starts) // 2]
    short = mistral3_transform(str(TEKKEN), max_seq_len=max_seq_len, max_image_size=224)
    unchecked = medpix_sample_dataset(short, check_lengths=False)
    failing = []
    for i in range(len(unchecked)):
        try:
            unchecked[i]
        except ValueError as e:
            assert "answer starts after" in str(e)
            failing.append(unchecked._data[i]["__medpix_row__"])
    assert 0 < len(failing) < len(unchecked) and failing == [r for r, s in enumerate(starts) if s >= max_seq_len]

    first = failing[0]
    with pytest.raises(ValueError) as info:
        medpix_sample_dataset(short)
    message = str(info.value)
    assert f"split 'train' row {first}: The sample needs " in message
    assert f"answer starts after max_seq_len={max_seq_len}" in message and "Raise max_seq_len" in message
    assert "skip_bad_rows=True" in message
    with caplog.at_level(logging.WARNING):
        ds = medpix_sample_dataset(short, skip_bad_rows=True)
    assert f"skipped {len(failing)} too long row(s) of 24" in caplog.text
    assert len(ds) == 24 - len(failing) and not set(failing) & set(ds._data["__medpix_row__"])
    for i in range(len(ds)):  # every kept row trains on something
        assert not all(ds[i]["mask"])


def test_programming_errors_keep_their_type(transform, monkeypatch):
    ds = medpix_sample_dataset(transform)

    def broken(messages, inference=False):
        raise TypeError("a bug, not bad data")

    monkeypatch.setattr(transform, "_encode", broken)
    with pytest.raises(TypeError, match="a bug, not bad data") as info:
        ds[3]
    assert "while transforming parquet split 'train' row 3" in info.value.__notes__
    assert info.traceback[-1].name == "broken"


def test_too_long_row_stops_tune_run_at_setup_or_is_skipped(tune, tmp_path):
    # demo transform (112 px images): answers start at token 18..42; with max_seq_len=33 the rows whose answer
    # starts at or after 33 cannot train (the dataset test above derives this rule from the full transform)
    demo = mistral3_transform(str(TEKKEN), max_seq_len=None, max_image_size=112)
    starts = [_answer_start(demo(s)) for s in map(_medpix.MedPixToMessages(), _sample_rows("train"))]
    too_long = [r for r, s in enumerate(starts) if s >= 33]
    assert 0 < len(too_long) < len(starts)
    run = ["run", "full_finetune_distributed", "--config", "mistral3p5_medpix_demo", "tokenizer.max_seq_len=33",
           "max_steps_per_epoch=1", "run_val_every_n_steps=null"]
    proc = tune(*run, f"output_dir={tmp_path / 'fail'}", check=False)
    assert proc.returncode == 1
    assert f"split 'train' row {too_long[0]}: The sample needs " in proc.stderr
    assert "answer starts after max_seq_len=33" in proc.stderr and "Step 1" not in proc.stderr + proc.stdout
    assert not list((tmp_path / "fail").glob("epoch_*")) and not (tmp_path / "fail" / "training_state").exists()
    proc = tune(*run, f"output_dir={tmp_path / 'skip'}", "dataset.skip_bad_rows=True", "dataset_val.skip_bad_rows=True")
    assert f"skipped {len(too_long)} too long row(s) of 24" in proc.stderr + proc.stdout
    assert (tmp_path / "skip" / "epoch_0").is_dir()


def test_pack_first_fit():
    # hand-derived: 5 -> pack 0, 4 -> pack 1, 3 fills pack 0, 2 -> pack 1, 8 -> pack 2, 1 -> pack 1
    assert pack_first_fit([5, 4, 3, 2, 8, 1], max_seq_len=8) == [[0, 2], [1, 3, 5], [4]]
    # window 1: only the newest pack stays open
    assert pack_first_fit([5, 4, 3, 2], max_seq_len=8, window=1) == [[0], [1, 2], [3]]
    with pytest.raises(ValueError, match="sample 1 has 9 tokens"):
        pack_first_fit([1, 9], max_seq_len=8)


def test_packed_sample_equals_unpacked_samples():
    # reference: the same rows unpacked (full pixel transform); each pack is their concatenation + padding
    max_seq_len = 105  # some samples (up to 117 tokens) are truncated, some answers cut off entirely (skipped)
    transform = mistral3_transform(str(TEKKEN), max_seq_len=max_seq_len, max_image_size=224)
    plain = medpix_sample_dataset(transform, skip_bad_rows=True)
    packed = medpix_sample_dataset(transform, skip_bad_rows=True, packed=True)
    assert sorted(r for p in packed.packs for r in p) == list(range(len(plain)))
    assert len(packed) < len(plain) and collate_for_dataset(packed, None) is padded_collate_packed_mistral3
    assert collate_for_dataset(plain, padded_collate_mistral3) is padded_collate_mistral3
    truncated = 0
    for index in range(len(packed)):
        pack = packed[index]
        assert len(pack["tokens"]) == len(pack["labels"]) == len(pack["input_pos"]) == max_seq_len
        start, images = 0, []
        for k, row in enumerate(packed.packs[index]):
            sample = plain[row]
            n = len(sample["tokens"])
            truncated += n == max_seq_len
            assert pack["seq_lens"][k] == n and pack["rows"][k] == row
            assert pack["tokens"][start : start + n] == sample["tokens"]
            assert pack["labels"][start : start + n] == [-100] + sample["labels"][1:]
            assert pack["input_pos"][start : start + n] == list(range(n))
            images += sample["encoder_input"]["image"]["images"]
            assert pack["images_per_sample"][k] == len(sample["encoder_input"]["image"]["images"])
            start += n
        assert pack["tokens"][start:] == [transform.pad_id] * (max_seq_len - start)
        assert set(pack["labels"][start:]) <= {-100} and sum(pack["seq_lens"]) == max_seq_len
        got = pack["encoder_input"]["image"]["images"]
        assert len(got) == len(images) and all(a.equal(b) for a, b in zip(got, images))
    assert truncated > 0  # a sample longer than max_seq_len is truncated as unpacked and fills a pack alone
    batch = padded_collate_packed_mistral3([packed[0], packed[1]])
    unpacked = padded_collate_mistral3([plain[r] for r in packed.packs[0] + packed.packs[1]])
    assert batch["encoder_input"]["image"]["image_sizes"].equal(unpacked["encoder_input"]["image"]["image_sizes"])
    assert batch["encoder_input"]["image"]["images_per_sample"].tolist() == [
        sum(packed[i]["images_per_sample"]) for i in (0, 1)
    ]
    for i in (0, 1):
        expected = [d for d, n in enumerate(packed[i]["seq_lens"]) for _ in range(n)]
        assert batch["document_ids"][i].tolist() == expected
        assert batch["input_pos"][i].tolist() == packed[i]["input_pos"]


def test_a_data_file_of_zero_rows_is_named(transform, tmp_path):
    empty = _write(_sample_table().slice(0, 0), tmp_path / "empty.parquet")
    with pytest.raises(ValueError, match=r"parquet data file\(s\) \[.*empty.parquet'\] hold 0 rows"):
        medpix_dataset(transform, source="parquet", data_files=empty, split_by_case=False)
    full = str(MEDPIX_SAMPLE_DIR / "train.parquet")
    with pytest.raises(ValueError, match="empty.parquet"):  # named among others (a glob or a split dict)
        medpix_dataset(transform, source="parquet", data_files={"train": [full, empty]}, split_by_case=False)


def test_an_unreachable_hub_says_how_to_get_the_data(tmp_path):
    code = (
        "from torchtune_mistral3.datasets import medpix_dataset\n"
        "from torchtune_mistral3.models.mistral3._transform import mistral3_transform\n"
        f"medpix_dataset(mistral3_transform({str(TEKKEN)!r}, max_seq_len=512))\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ConnectionError: Couldn't reach 'mmoukouba/MedPix-VQA' on the Hub"), last
    assert "datasets.load_dataset('mmoukouba/MedPix-VQA')" in last
    assert "dataset.source=parquet dataset.data_files=<files>" in last


def test_answers_cut_at_max_seq_len_are_counted_when_the_dataset_is_built(caplog):
    # reference: the full pixel transform without a limit gives each row's whole length and answer start
    whole = medpix_sample_dataset(mistral3_transform(str(TEKKEN), max_seq_len=None, max_image_size=224))
    samples = [whole[i] for i in range(len(whole))]
    lengths, starts = [len(s["tokens"]) for s in samples], [_answer_start(s) for s in samples]
    limit = max(starts) + 2  # every answer starts inside the limit: no row is refused
    cut = [r for r, n in enumerate(lengths) if n > limit]
    assert 0 < len(cut) < len(samples)
    with caplog.at_level(logging.WARNING):
        ds = medpix_sample_dataset(mistral3_transform(str(TEKKEN), max_seq_len=limit, max_image_size=224))
    assert len(ds) == len(samples)
    first = cut[0]
    assert (f"parquet: {len(cut)} of {len(samples)} rows are longer than max_seq_len={limit}: their answers are cut "
            f"and lose </s> (first: split 'train' row {first}, {lengths[first]} tokens)") in caplog.text
    # and what the message says: those samples end without </s>
    assert all(ds[r]["tokens"][-1] != ds._model_transform.eos_id for r in cut)
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a limit every row fits: no warning
        medpix_sample_dataset(mistral3_transform(str(TEKKEN), max_seq_len=max(lengths), max_image_size=224))
    assert "are cut" not in caplog.text
