"""The demo checkpoint writer creates new directories and rewrites only its own output: it never deletes a
user's files (issue 25, item 1)."""

import hashlib
import json

import pytest
from torchtune_mistral3.checkpointing import DEMO_HF_CONFIG, write_demo_checkpoint

MARKER = "demo_checkpoint.json"


def _digests(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A demo checkpoint written into a directory that did not exist."""
    return write_demo_checkpoint(str(tmp_path_factory.mktemp("demo") / "ckpt"))


def test_writes_a_new_directory_listing_its_files_and_keeps_it_on_the_next_call(written):
    marker = json.loads((written / MARKER).read_text())
    assert sorted(marker["files"]) == sorted(p.name for p in written.iterdir())
    assert {"config.json", "tekken.json", "model.safetensors.index.json"} <= set(marker["files"])
    before = {p.name: p.stat().st_mtime_ns for p in written.iterdir()}
    write_demo_checkpoint(str(written))
    assert {p.name: p.stat().st_mtime_ns for p in written.iterdir()} == before
    assert not list(written.parent.glob(f".{written.name}*"))  # no staging or partial directory left


def test_a_trained_checkpoint_with_user_files_is_refused_and_left_byte_identical(written, tmp_path):
    # the layout-mismatch advice: checkpoint_dir=<output_dir>/epoch_<N>, a trained checkpoint plus the user's notes
    epoch = tmp_path / "epoch_0"
    epoch.mkdir()
    for p in written.iterdir():
        if p.name != MARKER:
            (epoch / p.name).write_bytes(p.read_bytes())
    (epoch / "notes.txt").write_text("three weeks of work")
    before = _digests(epoch)
    with pytest.raises(FileExistsError) as e:
        write_demo_checkpoint(str(epoch))
    assert f"checkpoint_dir {epoch} holds " in str(e.value) and f"and no {MARKER} listing its files" in str(e.value)
    assert "prepare_checkpoint=null" in str(e.value)
    assert _digests(epoch) == before


def test_own_output_is_rewritten_but_not_with_a_foreign_file_in_it(written, tmp_path):
    own = tmp_path / "own"
    own.mkdir()
    for p in written.iterdir():
        (own / p.name).write_bytes(p.read_bytes())
    # another seed: the writer replaces its own output
    write_demo_checkpoint(str(own), seed=1)
    assert json.loads((own / MARKER).read_text())["seed"] == 1
    assert _digests(own)["model.safetensors.index.json"] == _digests(written)["model.safetensors.index.json"]
    assert _digests(own) != _digests(written)  # new weights
    (own / "adapter_notes.md").write_text("mine")
    before = _digests(own)
    with pytest.raises(FileExistsError, match=r"holds adapter_notes\.md, which the demo writer did not write"):
        write_demo_checkpoint(str(own), seed=2)
    with pytest.raises(FileExistsError):
        write_demo_checkpoint(str(own), seed=1, overwrite=True)
    assert _digests(own) == before


def test_empty_directory_is_filled_and_a_file_is_refused(tmp_path):
    config = {**DEMO_HF_CONFIG, "text_config": {**DEMO_HF_CONFIG["text_config"], "num_hidden_layers": 1}}
    empty = tmp_path / "empty"
    empty.mkdir()
    write_demo_checkpoint(str(empty), hf_config=config)
    assert (empty / "config.json").is_file()
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="is a file, not a directory"):
        write_demo_checkpoint(str(a_file), hf_config=config)
    assert a_file.read_bytes() == b"user data"
