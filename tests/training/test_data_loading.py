"""Data-loader workers: the same batches as without workers, also across a resume, and the compile counter."""

from functools import partial

import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchtune_mistral3.data import padded_collate_mistral3
from torchtune_mistral3.datasets import medpix_sample_dataset
from torchtune_mistral3.models.mistral3 import mistral3_transform
from torchtune_mistral3.training import (
    IndexedCollate,
    IndexedDataset,
    compiled_graph_count,
    loader_worker_options,
)

from tests.recipes.test_full_finetune_distributed import _losses


@pytest.fixture(scope="module")
def dataset():
    from pathlib import Path

    import mistral_common

    tekken = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
    return medpix_sample_dataset(mistral3_transform(str(tekken), max_seq_len=512, max_image_size=112), split="train")


def _loader(dataset, workers, seed_epoch=0):
    """The training loader as the recipe's ``_setup_data`` builds it (one data-parallel rank, shuffled)."""
    sampler = StatefulDistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=1234)
    sampler.set_epoch(seed_epoch)
    return StatefulDataLoader(
        dataset=IndexedDataset(dataset),
        batch_size=3,
        sampler=sampler,
        collate_fn=IndexedCollate(partial(padded_collate_mistral3, padding_idx=11, ignore_idx=-100)),
        drop_last=True,
        **loader_worker_options(workers, 2 if workers else None, "cpu"),
    )


def _same(a, b):
    """Nested batches equal (tensors exactly)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_workers_give_the_batches_of_the_training_process(dataset):
    plain = list(_loader(dataset, 0))
    with_workers = list(_loader(dataset, 2))
    assert len(plain) == len(dataset) // 3 == len(with_workers)
    assert all(_same(a, b) for a, b in zip(plain, with_workers))
    # the rows are carried through the workers too, in the sampler's order
    rows = [int(i) for b in with_workers for i in b["dataset_indices"]]
    assert rows == list(_loader(dataset, 0).sampler)[: len(plain) * 3]


def test_resume_with_workers_continues_with_the_batches_of_a_straight_run(dataset):
    straight = list(_loader(dataset, 0))
    first = _loader(dataset, 2)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    del it
    resumed = _loader(dataset, 2)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(straight) - 3
    assert all(_same(a, b) for a, b in zip(straight[3:], rest))


def test_bad_worker_options_name_the_key():
    with pytest.raises(ValueError, match="num_workers=-1"):
        loader_worker_options(-1, None, "cpu")
    with pytest.raises(ValueError, match="prefetch_factor=0"):
        loader_worker_options(2, 0, "cpu")
    assert loader_worker_options(0, 4, "cuda") == {"num_workers": 0, "pin_memory": True}
    assert loader_worker_options(2, None, "cpu") == {"num_workers": 2, "pin_memory": False,
                                                     "persistent_workers": True}


def test_compiled_graph_count_rises_on_a_recompile():
    torch._dynamo.reset()
    f = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    start = compiled_graph_count()
    f(torch.ones(3))
    f(torch.ones(3))
    assert compiled_graph_count() == start + 1
    f(torch.ones(5))  # a new static shape: one recompile
    assert compiled_graph_count() == start + 2


@pytest.mark.integration
def test_tune_run_with_workers_trains_and_resumes_like_the_run_without(tune, tmp_path):
    common = ["dtype=fp32", "run_val_every_n_steps=null", "max_steps_per_epoch=4", "save_every_n_steps=2",
              "batch_size=2", "compile=False"]
    plain, straight, resumed = tmp_path / "plain", tmp_path / "straight", tmp_path / "resumed"
    launch = ["run", "full_finetune_distributed", "--config", "mistral3p5_medpix_demo"]
    tune(*launch, f"output_dir={plain}", *common, "num_workers=0")
    tune(*launch, f"output_dir={straight}", *common, "num_workers=2")
    # the loader's state saved with workers resumes with workers (torchdata cannot change the worker count)
    (resumed / "training_state").mkdir(parents=True)
    import shutil

    shutil.copytree(straight / "training_state" / "step_2", resumed / "training_state" / "step_2")
    proc = tune(*launch, f"output_dir={resumed}", *common, "num_workers=2", "resume_from_checkpoint=True")
    assert "Resumed from" in proc.stdout + proc.stderr
    a, b, c = _losses(plain), _losses(straight), _losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4] and sorted(c) == [3, 4]
    assert all(a[k] == b[k] for k in a) and a[3] == c[3] and a[4] == c[4]
    # every step logs its wall time, its data wait and the graphs compiled so far
    (log,) = (resumed / "logs").glob("*.txt")
    text = log.read_text()
    assert text.count("data_wait_s:") == 2 and text.count("step_time_s:") == 2 and "compiled_graphs:" in text
