"""The step-time planner: schedule replay against hand-derived bubbles, the cost table against measured slices."""

import json
from pathlib import Path

import pytest
from torchtune_mistral3.planning._step_plan import (
    PROVISIONAL_FILE,
    TABLE_FILE,
    CostTable,
    MicroBatch,
    predict_slice,
    replay_schedule,
    schedule_order,
    stage_time,
)

from tests.conftest import load_bench

REPO = Path(__file__).resolve().parents[2]
F, B = 1.0, 2.0  # unequal forward and backward: the closed forms below hold for any


def _unit(v=1):
    return lambda stage, kind: {"F": F / v, "B": B / v, "I": B / 2 / v, "W": B / 2 / v}[kind]


@pytest.mark.parametrize("schedule", ["1F1B", "GPipe"])
@pytest.mark.parametrize("pp,m", [(2, 2), (2, 4), (4, 8), (8, 8), (8, 16)])
def test_single_stage_bubble_is_p_minus_1_over_m_plus_p_minus_1(schedule, pp, m):
    rep = replay_schedule(schedule_order(schedule, pp, m), _unit())
    assert rep.makespan == pytest.approx((m + pp - 1) * (F + B))
    for r in range(pp):
        assert 1 - rep.busy[r] / rep.makespan == pytest.approx((pp - 1) / (m + pp - 1))


def test_gpipe_sends_add_one_latency_per_hop_each_way():
    # forwards reach the last stage after (p-1) hops, the backwards come back over (p-1) more
    pp, m, send = 4, 8, 0.25
    rep = replay_schedule(schedule_order("GPipe", pp, m), _unit(), send_s=send)
    assert rep.makespan == pytest.approx((m + pp - 1) * (F + B) + 2 * (pp - 1) * send)


def test_interleaved_1f1b_hand_worked():
    # pp=2, 2 stages per rank (rank 0: stages 0, 2; rank 1: 1, 3), 2 micro-batches, f=1 and b=2 per stage.
    # rank 0 runs 0F0 0F1 2F0 2F1 2B0 2B1 0B0 0B1, rank 1 runs 1F0 1F1 3F0 3B0 3F1 3B1 1B0 1B1:
    #   0F0 [0,1] 0F1 [1,2] | 1F0 [1,2] 1F1 [2,3] | 2F0 [2,3] 2F1 [3,4] | 3F0 [3,4] 3B0 [4,6] 3F1 [6,7] 3B1 [7,9]
    #   2B0 [6,8] 2B1 [9,11] | 1B0 [9,11] 1B1 [11,13] | 0B0 [11,13] 0B1 [13,15]
    order = schedule_order("Interleaved1F1B", 2, 2)
    assert [str(a) for a in order[0] if a is not None] == ["0F0", "0F1", "2F0", "2F1", "2B0", "2B1", "0B0", "0B1"]
    rep = replay_schedule(order, lambda s, k: {"F": 1.0, "B": 2.0}[k])
    assert rep.makespan == 15.0 and rep.finish[1] == 13.0 and rep.busy == {0: 12.0, 1: 12.0}
    # and the closed form m v (f + b) + (p - 1)(f + b) of interleaving at m = 4 and 8
    for pp, m in ((2, 4), (4, 8), (8, 16)):
        rep = replay_schedule(schedule_order("Interleaved1F1B", pp, m), lambda s, k: {"F": 1.0, "B": 2.0}[k])
        assert rep.makespan == pytest.approx(m * 2 * 3 + (pp - 1) * 3)


def test_zero_bubble_schedules_beat_1f1b_with_equal_work():
    base = replay_schedule(schedule_order("1F1B", 4, 8), _unit()).makespan
    for name in ("InterleavedZeroBubble", "ZBVZeroBubble"):
        rep = replay_schedule(schedule_order(name, 4, 8), _unit(2))
        assert m_work(8) <= rep.makespan < base


def m_work(m):
    return m * (F + B)


def _slices(table):
    return [(kind, r) for kind in ("slice_first", "slice_middle") for r in table.data[kind]]


def test_cost_table_predicts_the_measured_slices_within_10_percent():
    if not TABLE_FILE.is_file():
        pytest.skip(f"no {TABLE_FILE.name} yet: run bench/step_costs.py on an H200 (docs/performance.md section 6)")
    table = CostTable.load(str(TABLE_FILE))
    assert not table.provisional
    slices = _slices(table)
    for kind in ("slice_first", "slice_middle"):
        shapes = {(r["batch"], r["seq"]) for k, r in slices if k == kind}
        assert len(shapes) >= 2, f"{kind}: {len(shapes)} micro-batch shape(s) recorded, the check needs two"
    for kind, r in slices:
        predicted = predict_slice(table, kind, r)
        assert predicted == pytest.approx(r["step_s"], rel=0.10), (kind, r)


def _same(a, b) -> bool:
    """Equal JSON trees, floats to a relative 1e-12."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-12, abs=1e-300)
    return a == b


def test_provisional_table_is_what_the_step_speed_runs_give():
    shipped = json.loads(PROVISIONAL_FILE.read_text())
    derived = load_bench("cost_tables").derive_provisional_table(str(REPO / "bench" / "results"))
    derived = json.loads(json.dumps(derived))
    # regenerated from the results, not edited by hand (floats to 1e-12: least squares' last bits vary with BLAS)
    assert _same(shipped, derived)
    # the derivation rebuilds the 4-layer slice of another run (head, tower, projector, optimizer estimated)
    check = shipped["check_4layer_slice"]
    assert check["rebuilt_s"] == pytest.approx(check["measured_s"], rel=0.05)


def test_cli_prints_the_step_plan_with_the_cost_balanced_split(capsys):
    from torchtune_mistral3.planning import main

    assert main(["--config", "mistral3p5_medpix", "plan.world_size=64", "plan.json=True"]) == 0
    out = json.loads(capsys.readouterr().out)
    step = out["step"]
    split, per_stage = step["layer_split"], step["stage_s"]
    assert sum(split) == 88 and len(per_stage) == len(split)
    held = [sum(split[s] for s in r["stages"]) for r in step["ranks"]]
    assert [r["layers"] for r in out["ranks_gib"]] == held  # both plans cut the same stages
    # cost-balanced: every stage's forward + backward within one decoder layer's of the mean
    layer = per_stage[3] / split[3]  # a middle stage is layers only
    mean = sum(per_stage) / len(per_stage)
    assert max(per_stage) - mean <= layer and mean - min(per_stage) <= layer
    assert 0 < step["mfu"] < 1 and step["real_tokens_per_s_per_gpu"] > 0


@pytest.mark.parametrize("overrides", [
    [],  # packed, compiled, tower split over TP 8
    ["dataset.packed=False"],
    ["enable_activation_checkpointing=True", "compile=False"],
    ["tensor_parallel_tower=replicate", "batch_size=36", "pipeline_microbatches=18"],
    ["tensor_parallel_dim=4", "tokenizer.max_seq_len=4096"],
])
def test_the_recipes_stage_split_is_the_planners(overrides):
    # the recipe passes its own values (no optimizer); the planner translates the whole config: the same stages
    from torchtune_mistral3.planning import (
        build_meta_model,
        cost_balanced_stage_extras,
        layout_from_config,
        load_config,
    )
    from torchtune_mistral3.planning._memory_plan import model_dims
    from torchtune_mistral3.planning._step_plan import cost_balanced_extras

    cfg = load_config("mistral3p5_medpix", overrides)
    model = build_meta_model(size="mistral3p5_128b")
    layout, options = layout_from_config(cfg)
    planner = cost_balanced_extras(CostTable.load(options["cost_table"]), model_dims(model), layout,
                                   tower_split=options["tower_split"])
    recipe = cost_balanced_stage_extras(
        model, tp=cfg.tensor_parallel_dim, batch_size=cfg.batch_size, microbatches=cfg.pipeline_microbatches,
        seq_len=cfg.tokenizer.max_seq_len, activation_checkpointing=cfg.enable_activation_checkpointing,
        compile=cfg.compile, tower_split=cfg.tensor_parallel_tower == "split", packed=cfg.dataset.packed,
    )
    assert recipe == planner


def _synthetic_table():
    # times from known formulas, so the fits can be checked against them at shapes not in the table
    def layer(b, s, scale=1.0):
        t = b * s
        return {"batch": b, "seq": s, "ac": False, "forward_s": scale * (1e-3 + 2e-6 * t + 1e-10 * t * s),
                "backward_s": scale * 2 * (1e-3 + 2e-6 * t + 1e-10 * t * s)}

    shapes = [(1, 2048), (2, 2048), (1, 4096)]
    return {
        "dims": {"hidden": 16, "vision_hidden": 8, "vocab": 64, "num_heads": 2, "num_kv_heads": 1, "head_dim": 8,
                 "ffn": 32, "vision_layers": 1, "vision_ffn": 16},
        "layer": {"1": [layer(b, s) for b, s in shapes], "8": [layer(b, s, scale=0.25) for b, s in shapes]},
        "tower": [{"patches_per_image": p, "forward_s": 1e-3 + 1e-5 * sum(p) + 1e-9 * sum(x * x for x in p)}
                  for p in ([400], [1444], [5476], [400, 1444])],
        "projector": [{"image_tokens": n, "forward_s": 1e-6 * n, "backward_s": 2e-6 * n} for n in (100, 361)],
        "embeddings": [{"batch": 1, "seq": s, "forward_s": 1e-7 * s, "backward_s": 1e-3} for s in (2048, 4096)],
        "head": {"1": [{"batch": 1, "seq": s, "forward_s": 1e-6 * s, "backward_s": 2e-6 * s} for s in (2048, 4096)]},
        "optimizer": [{"dtype": "bfloat16", "fused": True, "params": n, "step_s": 1e-4 + 5e-12 * n}
                      for n in (10**8, 10**9)],
    }


def test_table_fits_reproduce_their_formulas_off_the_measured_shapes():
    table = CostTable(_synthetic_table())
    f, b = table.layer(1, 4, 1024, ac=False)  # 4 x 1024: no such entry
    t = 4096
    assert f == pytest.approx(1e-3 + 2e-6 * t + 1e-10 * t * 1024) and b == pytest.approx(2 * f)
    # TP8 measured: exact; TP2: TP1 / 2 times the TP8 shard's loss (0.25 x 8 = 2) to the power log 2 / log 8
    assert table.layer(8, 1, 2048, ac=False)[0] == pytest.approx(0.25 * (1e-3 + 2e-6 * 2048 + 1e-10 * 2048**2))
    f1, _ = table.layer(1, 1, 2048, ac=False)
    assert table.layer(2, 1, 2048, ac=False)[0] == pytest.approx(f1 / 2 * 2 ** (1 / 3))
    assert table.tower([38 * 38, 74 * 74]) == pytest.approx(
        1e-3 + 1e-5 * (1444 + 5476) + 1e-9 * (1444**2 + 5476**2))
    assert table.projector(1369) == pytest.approx((1.369e-3, 2.738e-3))
    assert table.optimizer(1.38e9, 2, True) == pytest.approx(1e-4 + 5e-12 * 1.38e9)


def test_tower_split_shares_tower_and_projector_and_follows_the_recipe_key():
    from omegaconf import OmegaConf
    from torchtune_mistral3.planning import layout_from_config
    from torchtune_mistral3.planning._step_plan import H200, MicroBatch, stage_time

    table = CostTable(_synthetic_table())
    mb = MicroBatch(batch=1, seq=2048, patches=(1444, 5476), image_tokens=(1444 + 5476) // 4)
    kw = dict(layers=0, first=True, last=False, mb=mb, tp=8, hw=H200)
    rep, split = stage_time(table, **kw).parts, stage_time(table, tower_split=True, **kw).parts
    c = H200.compute_scale()
    # by hand: 1/8 of the tower and projector, plus one all-gather of the projected bf16 features (width 16)
    gather = 7 / 8 * mb.image_tokens * 16 * 2 / (H200.nvlink_gbps * 1e9) + 20e-6
    assert split["tower"] == pytest.approx(rep["tower"] / 8 + gather * c)
    assert split["projector"] == pytest.approx(rep["projector"] / 8)

    def tower_split(**keys):
        return layout_from_config(OmegaConf.create({"tensor_parallel_dim": 8, **keys}))[1]["tower_split"]

    assert tower_split()  # the recipe's default under TP
    assert not tower_split(tensor_parallel_tower="replicate")
    assert not tower_split(tensor_parallel_dim=1)
    assert tower_split(tensor_parallel_tower="replicate", plan={"tower_split": True})  # the planner's override


def test_packed_attention_section_is_what_the_attention_runs_give():
    from torchtune_mistral3.planning._step_plan import PACKED_ATTENTION_FILE

    shipped = json.loads(PACKED_ATTENTION_FILE.read_text())
    derived = load_bench("cost_tables").derive_packed_attention(str(REPO / "bench" / "results"))
    assert _same(shipped, json.loads(json.dumps(derived)))
    assert set(shipped["packed_attention"]) == {"1", "8"}


def test_packed_micro_batches_pay_the_kernel_the_recipe_picks():
    # TP 8, one pack of 2048 tokens, 1 KV head per rank: 16 flex backward programs, so the dense-mask SDPA time;
    # 6 packs: 96 programs, so flex. Extra per layer = (kernel per pack - causal per sequence) x packs.
    table = CostTable.load()
    rows = {r["packs"]: r for r in table.data["packed_attention"]["8"]}
    for packs, kernel in ((1, "dense_s_per_pack"), (6, "flex_s_per_pack")):
        f, b = table.packed_attention(8, packs, kv_heads=1, seq=2048)
        want = (rows[packs][kernel] - rows[packs]["causal_s_per_sequence"]) * packs
        assert f + b == pytest.approx(want, rel=1e-12) and f / (f + b) == pytest.approx(2 / 7)
    # and the stage time charges it to packed micro-batches only
    unpacked = stage_time(table, layers=1, first=False, last=False, mb=MicroBatch(1, 2048), tp=8)
    packed = stage_time(table, layers=1, first=False, last=False, mb=MicroBatch(1, 2048, packed=True), tp=8)
    f, b = table.packed_attention(8, 1, kv_heads=1, seq=2048)
    assert packed.forward - unpacked.forward == pytest.approx(f)
    assert packed.backward - unpacked.backward == pytest.approx(b)


@pytest.mark.parametrize("tp", [1, 8])
def test_planner_predicts_the_measured_packed_layers_within_10_percent(tp):
    # bench/packed_layer.py on the H200: one compiled decoder layer at a TP rank's shard shape, forward + backward
    # per micro-batch of P packs (block-causal, both kernels) and of P unpacked causal sequences of 2048 tokens.
    from torchtune_mistral3.models.mistral3 import packed_attention_prefers_flex

    run = json.loads((REPO / "bench" / "results" / f"packed_layer_tp{tp}_h200.json").read_text())
    table = CostTable.load()
    assert run["tp"] == tp and run["compiled"] and len(run["cases"]) >= 2
    for case in run["cases"]:
        p = case["packs"]
        kernel = "flex" if packed_attention_prefers_flex(p, run["kv_heads_per_rank"], run["seq"]) else "dense"
        for packed, measured in ((False, case["causal"]), (True, case[kernel])):
            st = stage_time(table, layers=1, first=False, last=False, mb=MicroBatch(p, 2048, packed=packed), tp=tp)
            # compute only: the bench runs no collectives
            assert st.parts["layers"] == pytest.approx(measured["s_per_microbatch"], rel=0.10), (p, packed)
        # the kernel picked is the faster one inside the layer too, or within 1% of it
        best = min(case["dense"]["s_per_microbatch"], case["flex"]["s_per_microbatch"])
        assert case[kernel]["s_per_microbatch"] <= 1.01 * best, (p, kernel)


def test_tp_overlap_what_if_hides_that_share_of_the_layer_collectives(capsys):
    from torchtune_mistral3.planning import main

    args = ["--config", "mistral3p5_medpix", "plan.world_size=64", "plan.gpu_gib=79.6", "plan.json=True"]
    steps = {}
    for share in (0.0, 0.5, 1.0):
        main([*args, f"plan.tp_overlap={share}"])
        steps[share] = json.loads(capsys.readouterr().out)["step"]
    # the pipeline replays the same actions with each layer's collectives shortened: the step falls with the share
    assert steps[0.0]["step_s"] > steps[0.5]["step_s"] > steps[1.0]["step_s"]
    with pytest.raises(SystemExit):
        main([*args, "plan.tp_overlap=1.5"])
    assert "must lie in [0, 1]" in capsys.readouterr().err
    main(args[:-1] + ["tensor_parallel_async=True"])
    assert "tensor_parallel_async=True: the overlap it buys is not in this plan" in capsys.readouterr().out
