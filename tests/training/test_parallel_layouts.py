"""PP combined with TP and with FSDP (4 processes each): training equal to one process."""

from _parallel_harness import run_layout


def test_pp2_tp2_matches_single_process():
    # Loss parallel through the pipeline, with chunked logits on the last stage.
    reports = run_layout(4, pp=2, tp=2, schedule="1F1B", microbatches=2, output_chunks=4)
    assert [r["stage_ids"] for r in reports] == [[0], [0], [1], [1]]
    assert [r["logits"] for r in reports[2:]] == [["4xDTensor(Shard(dim=2),):32/64"]] * 2
    for r in reports:
        print(f"pp2 x tp2 rank {r['rank']} stages {r['stage_ids']} holds {r['local_numel']}/{r['full_numel']}",
              r["diffs"])
    # Each TP pair holds half of its stage; the two stages hold the whole model.
    assert reports[0]["local_numel"] + reports[2]["local_numel"] < 0.6 * reports[0]["full_numel"]


def test_pp2_fsdp2_interleaved_matches_single_process():
    reports = run_layout(4, pp=2, tp=1, schedule="Interleaved1F1B", microbatches=4)
    assert [r["stage_ids"] for r in reports] == [[0, 2], [0, 2], [1, 3], [1, 3]]
    for r in reports:
        print(f"pp2 x fsdp2 rank {r['rank']} stages {r['stage_ids']} holds {r['local_numel']}/{r['full_numel']}",
              r["diffs"])
    assert sum(r["local_numel"] for r in reports) == reports[0]["full_numel"]
