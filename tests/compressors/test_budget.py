"""The budget planner on a tiny Llama: exact bytes, artifacts that never exceed the budget and
match the plan to the byte, monotone plans, one shared solver, clear errors."""

import copy
import inspect
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import presso.compressors.gradient.lgreco as lgreco
import presso.compressors.plan.knapsack as solver
import presso.compressors.plan.planner as budget
from presso import ConfigError, UnsupportedError
from presso.compressors.formats.artifact import save_compressed
from presso.compressors.plan.candidates import CandidateGrid, measure_layer, solver_error
from presso.compressors.plan.planner import (
    BudgetConfig,
    Planner,
    measure_model,
    min_artifact_bytes,
    output_sensitivity,
    parse_bytes,
    planned_layers,
)
from presso.compressors.ptq.blocks import compress_model
from presso.compressors.ptq.calibration import HessianStats


class _Tokenizer:
    """Writes tokenizer files of fixed content, one in a sub-folder (the sizes must count)."""

    def save_pretrained(self, folder) -> None:
        (Path(folder) / "tokenizer.json").write_text('{"model": "bytes", "vocab": 96}\n')
        (Path(folder) / "extra").mkdir()
        (Path(folder) / "extra" / "merges.txt").write_text("a b\n" * 50)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def planned(make_llama):
    """The conftest's 2-layer tiny Llama, its calibration batches and a planner over the
    default candidates; built once for the module, since measuring is the slow part."""
    torch.set_num_threads(1)
    model = make_llama()
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 96, (2, 16), generator=gen) for _ in range(4)]
    options = measure_model(model, calib, CandidateGrid())
    return model, calib, Planner(model, options, _Tokenizer())


def _no_upgrade_fits(planner, plan, max_bytes: int) -> bool:
    """What is left of the budget buys nothing that matters: no layer can move to another
    candidate that cuts the plan's error by 1 % and still fit. With W6 and W8 on offer, a large
    budget's plan may stop short of it when every next step costs more."""
    choice = [opts.index(o) for opts, o in zip(planner.options, plan.chosen)]
    for layer, opts in enumerate(planner.options):
        for k, o in enumerate(opts):
            if plan.chosen[layer].error - o.error > 0.01 * plan.total_error:
                swapped = choice[:layer] + [k] + choice[layer + 1 :]
                if planner.plan(swapped).artifact_bytes <= max_bytes:
                    return False
    return True


def _solve_and_save(model, calib, plan, path):
    model = copy.deepcopy(model)
    records = compress_model(model, plan.recipe(), calib, ignore=["lm_head", *plan.ignore])
    return records, save_compressed(model, records, path, _Tokenizer())


def test_planned_artifacts_match_their_size_and_never_exceed_the_budget(planned, tmp_path):
    """The promise of a byte budget: the folder written (weights, header, config.json,
    tokenizer files, manifest) is exactly the size the plan predicted, and never above the
    budget. Budgets from the smallest possible artifact to one where layers stay dense."""
    model, calib, planner = planned
    smallest = planner.smallest().artifact_bytes
    kinds = set()
    for i, max_bytes in enumerate([smallest, smallest + 997, 60_000, 75_000, 90_000, 140_000]):
        plan = planner.for_bytes(max_bytes)
        records, info = _solve_and_save(model, calib, plan, tmp_path / f"a{i}")
        assert info.artifact_bytes == plan.artifact_bytes <= max_bytes
        left = max_bytes - plan.artifact_bytes  # the budget is used, or nothing more helps
        assert left < 0.02 * max_bytes or _no_upgrade_fits(planner, plan, max_bytes)
        assert [r.format for r in records.values()] == [o.format for o in plan.chosen if o.format]
        kinds |= {o.candidate.kind for o in plan.chosen}
    assert kinds >= {"quant", "dense"}  # the plans above really mix settings


def test_candidate_bytes_equal_the_bytes_stored_for_each_layer(planned, tmp_path):
    """Every candidate kind — grids, 2:4 and unstructured masks (with and without codes),
    low-rank factors — must count exactly the tensor bytes the artifact stores for the layer,
    and the solved record must have exactly the shapes the candidate predicted. A layer left
    dense is stored in the artifact's storage dtype (fp16 for this fp32 model)."""
    model, calib, planner = planned
    layer = planner.names[-2]  # the last decoder layer (the tied embedding comes after it)
    options = planner.options[-2]
    assert {o.candidate.kind for o in options} == {"quant", "sparse", "lowrank", "dense"}
    weight = model.get_submodule(layer).weight.detach()
    stats = HessianStats.empty(weight.shape[1])
    stats.update(torch.randn(256, weight.shape[1]))
    for option in options:
        algo = option.candidate.solver()
        if algo is None:
            assert option.bytes == weight.numel() * torch.float16.itemsize
            continue
        record = algo.compress(weight, stats, layer)
        shapes = {s: (t.dtype, tuple(t.shape)) for s, t in record.tensors().items()}
        assert shapes == option.specs, option.candidate.label
        assert (record.format, record.scheme()) == (option.format, option.scheme)

    plan = planner.for_bytes(90_000)
    _, info = _solve_and_save(model, calib, plan, tmp_path / "art")
    stored = {}
    with safe_open(tmp_path / "art" / "model.safetensors", "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            t = f.get_tensor(key)
            stored[key.rsplit(".", 1)[0]] = stored.get(key.rsplit(".", 1)[0], 0) + t.nbytes
    for name, option in zip(plan.names, plan.chosen):
        assert stored[name] == option.bytes, name
    assert info.compressed_bytes == sum(o.bytes for o in plan.chosen if o.format)


def test_a_tighter_budget_never_gives_lower_error(planned):
    """Monotone plans: a budget that allows more bytes can always reuse the smaller budget's
    plan, so its predicted error can only be lower or equal (also for avg_bits)."""
    _, _, planner = planned
    smallest = planner.smallest().artifact_bytes
    errors = [planner.for_bytes(smallest + step).total_error for step in range(0, 120_000, 10_000)]
    assert errors == sorted(errors, reverse=True)
    assert errors[0] > errors[-1]
    errors = [planner.for_avg_bits(b).total_error for b in (2.5, 3, 3.5, 4, 5, 8, 16)]
    assert errors == sorted(errors, reverse=True)


def test_avg_bits_budget_counts_every_stored_byte(planned, tmp_path):
    """avg_bits is the artifact's own measure (scales, zeros, masks included) over the
    planned layers; with no layer left dense it equals save_compressed's avg_bits."""
    model, calib, planner = planned
    plan = planner.for_avg_bits(3.5)
    assert plan.avg_bits <= 3.5 and not plan.ignore
    _, info = _solve_and_save(model, calib, plan, tmp_path / "art")
    assert info.avg_bits == pytest.approx(plan.avg_bits, rel=1e-12)


def test_gradient_controller_and_weight_planner_share_one_solver():
    """One knapsack serves both halves of presso: L-GreCo and the budget planner must call the
    very same functions of presso.compressors.plan.knapsack, not copies."""
    assert budget.min_error_within_bytes is solver.min_error_within_bytes
    assert budget.min_bytes_within_error is solver.min_bytes_within_error
    assert lgreco.min_bytes_within_error is solver.min_bytes_within_error
    for module in (budget, lgreco):
        assert "def _knapsack" not in inspect.getsource(module)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (40_000_000, 40_000_000),
        ("40000000", 40_000_000),
        ("40MB", 40_000_000),
        ("40MiB", 40 * 2**20),
        ("1.5 kB", 1500),
        ("2GiB", 2 * 2**30),
        ("512b", 512),
    ],
)
def test_byte_budgets_in_the_users_words(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["40 MBs", "-3MB", "MB", "forty", "1e6"])
def test_unreadable_byte_budget_names_the_key(text):
    with pytest.raises(ConfigError, match=r"compress\.budget\.bytes: expected a byte count"):
        parse_bytes(text)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({}, "set exactly one of"),
        ({"bytes": "40MB", "avg_bits": 4.0}, "set exactly one of"),
        ({"avg_bits": -1.0}, r"budget\.avg_bits: must be in"),
        ({"max_ppl_increase_pct": -5.0}, r"budget\.max_ppl_increase_pct: must be in"),
        ({"bytes": "40 parsecs"}, r"budget\.bytes: expected a byte count"),
        ({"avg_bits": 4.0, "search_steps": 0}, r"budget\.search_steps: must be in"),
    ],
)
def test_budget_config_validation(fields, match):
    with pytest.raises(ConfigError, match=match):
        BudgetConfig(**fields).validate("compress.budget")


def test_infeasible_budgets_fail_clearly(planned):
    """A budget below the smallest artifact is the user's to fix: the planner says how small
    the artifact can get, and the shape-only size (no calibration needed) is that of the
    smallest plan made of quantized and pruned settings, metadata included."""
    model, _, planner = planned
    smallest = planner.smallest().artifact_bytes
    with pytest.raises(UnsupportedError, match=f"below the smallest artifact.*{smallest:,}"):
        planner.for_bytes(smallest - 1)
    shaped = {
        n: [o for o in opts if o.candidate.kind != "lowrank"]
        for n, opts in zip(planner.names, planner.options)
    }
    smallest = Planner(model, shaped, _Tokenizer()).smallest().artifact_bytes
    bound = min_artifact_bytes(model, CandidateGrid(), ["lm_head"], _Tokenizer())
    assert bound == smallest


def test_error_budget_search_keeps_the_smallest_plan_within_the_target(planned):
    """The max_ppl_increase_pct search: every plan it returns met the target when measured,
    no smaller measured plan met it, and an unreachable target is an error, not a silent
    dense model."""
    _, _, planner = planned
    base = 10.0
    top = planner.smallest().total_error

    def ppl_of(plan):
        return base * (1 + plan.total_error / top)  # a smooth stand-in for a measurement

    best, history = planner.search_ppl(ppl_of, base, 5.0, steps=8)
    assert ppl_of(best) <= base * 1.05 and len(history) == 8
    passing = [h["artifact_bytes"] for h in history if h["ppl"] <= base * 1.05]
    assert best.artifact_bytes == min(passing)
    with pytest.raises(UnsupportedError, match="no plan tried"):
        planner.search_ppl(lambda plan: 2 * base, base, 5.0, steps=3)
    guess = top / 7
    _, history = planner.search_ppl(ppl_of, base, 5.0, steps=3, first=guess)
    assert history[0]["max_error"] == guess  # a first guess inside the range is tried first
    _, history = planner.search_ppl(ppl_of, base, 5.0, steps=3, first=top * 2)
    assert history[0]["max_error"] < top  # one outside it is not


def test_plan_table_lists_every_layer_and_the_totals(planned):
    _, _, planner = planned
    plan = planner.for_bytes(80_000)
    lines = plan.table().splitlines()
    assert len(lines) == len(plan.names) + 2
    assert lines[-1].startswith("total") and f"{plan.artifact_bytes:,}" in lines[-1]
    assert json.loads(json.dumps(plan.rows()))[0]["layer"] == plan.names[0]
    settings = len({o.candidate for o in plan.chosen})
    assert plan.describe().count("×") == settings > 1
    short = plan.describe(top=1)
    assert short.count("×") == 2 and short.endswith(f"in {settings - 1} other settings")


def test_output_sensitivity_is_each_outputs_mean_squared_loss_gradient(tiny_llama):
    """The loss weights must be ½·mean over tokens of (∂L/∂y)², L the summed next-token loss,
    for every planned layer, computed here the plain autograd way; and measuring must leave
    the model as it found it (weights, requires_grad, no .grad)."""
    model = tiny_llama
    gen = torch.Generator().manual_seed(2)
    calib = [torch.randint(0, 96, (2, 12), generator=gen) for _ in range(3)]
    before = copy.deepcopy(model.state_dict())
    sens = output_sensitivity(model, calib)

    layers = planned_layers(model, ["lm_head"])
    assert set(sens) == set(layers)
    expected = {name: 0.0 for name in layers}
    outputs = {}
    hooks = [
        lin.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
        for name, lin in layers.items()
    ]
    for ids in calib:
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        grads = torch.autograd.grad(loss, [outputs[n] for n in layers])
        for name, g in zip(layers, grads):
            expected[name] = expected[name] + g.reshape(-1, g.shape[-1]).double().square().sum(0)
    for h in hooks:
        h.remove()
    tokens = sum(ids.numel() for ids in calib)
    for name in layers:
        torch.testing.assert_close(sens[name].double(), expected[name] / (2 * tokens), rtol=1e-4,
                                   atol=1e-12)  # fmt: skip
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_the_embeddings_pricing_is_its_two_uses_loss_gradients(tiny_llama):
    """The tied embedding is priced in both uses, the plain autograd way: per vocabulary row,
    ½·Σ over the tokens that looked it up of (∂L/∂e)²/T; per logit ½·mean (∂L/∂logit)²; and the
    head's input Hessian the mean x xᵀ of the final hidden states."""
    model = tiny_llama
    gen = torch.Generator().manual_seed(3)
    calib = [torch.randint(0, 96, (2, 12), generator=gen) for _ in range(2)]
    priced = output_sensitivity(model, calib, embedding=True)["model.embed_tokens"]
    rows, head, hessian = torch.zeros(96, 64, dtype=torch.float64), 0.0, 0.0
    for ids in calib:
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        hidden = model.model(inputs_embeds=embeds).last_hidden_state
        logits = model.lm_head(hidden)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, 96), ids[:, 1:].reshape(-1), reduction="sum"
        )
        g_embeds, g_logits = torch.autograd.grad(loss, [embeds, logits])
        rows.index_add_(0, ids.reshape(-1), g_embeds.reshape(-1, 64).double().square())
        head = head + g_logits.reshape(-1, 96).double().square().sum(0)
        x = hidden.detach().reshape(-1, 64).double()
        hessian = hessian + x.T @ x
    tokens = sum(ids.numel() for ids in calib)
    torch.testing.assert_close(priced.rows, rows / (2 * tokens), rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(priced.head, head / (2 * tokens), rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(priced.head_hessian, hessian / tokens, rtol=1e-4, atol=1e-9)


def test_the_tied_embedding_is_one_planned_decision(planned, tmp_path):
    """A small model's largest tensor must be in the plan, not outside it: the tied
    embedding/lm_head is one decision (as stored, or a grid), priced errors rising as bits fall;
    the smallest plan packs it, and the artifact stores it once, packed, at the planned size."""
    model, calib, planner = planned
    assert planner.names[-1] == planner.embedding == "model.embed_tokens"
    options = planner.options[-1]
    labels = [o.candidate.label for o in options]
    assert labels == ["W8 ch", "W6 ch", "W5 ch", "W4 ch", "dense"]  # 64 columns: one group
    errors = [o.error for o in options]
    assert errors[3] > errors[2] > errors[1] > errors[0] > errors[4] == 0
    plan = planner.smallest()
    assert plan.recipe().embedding.bits == 4 and "model.embed_tokens" not in plan.ignore
    records, info = _solve_and_save(model, calib, plan, tmp_path / "art")
    assert info.artifact_bytes == plan.artifact_bytes
    with safe_open(tmp_path / "art" / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight_packed" in names
    assert (
        not any(n.startswith("lm_head") for n in names) and "model.embed_tokens.weight" not in names
    )
    unplanned = Planner(model, {n: o for n, o in zip(planner.names[:-1], planner.options)})
    assert unplanned.embedding is None and unplanned.smallest().recipe().embedding is None


def test_weighted_errors_are_each_outputs_error_times_its_weight():
    """Weights of one make the plain tr(ΔHΔᵀ); a weight on one output alone leaves that
    output's error alone, so the weighting is per output, not a layer-wide factor."""
    torch.manual_seed(0)
    weight, x = torch.randn(6, 32), torch.randn(200, 32)
    stats = HessianStats.empty(32)
    stats.update(x)
    grid = CandidateGrid(bits=[3], group_sizes=[-1], symmetric=[True], sparse_patterns=[],
                         lowrank_energy=[], dense=False, solver_scaled=False)  # fmt: skip
    plain = measure_layer(weight, stats, grid)
    assert measure_layer(weight, stats, grid, row_weights=torch.ones(6))[0].error == (
        pytest.approx(plain[0].error, rel=1e-6)
    )
    one_row = torch.zeros(6)
    one_row[2] = 5.0
    delta = plain[0].candidate.proxy(weight).dequantize() - weight
    row_error = float(((x @ delta[2]) ** 2).mean())
    assert measure_layer(weight, stats, grid, row_weights=one_row)[0].error == pytest.approx(
        5.0 * row_error, rel=1e-4
    )


def test_solver_scaled_errors_are_the_solvers_on_each_kinds_median_candidate():
    """The planner must weigh a layer by the error GPTQ / SparseGPT will leave, not by the
    round-to-nearest error: the median candidate of each kind gets exactly its solver's error,
    and the kind's other candidates keep their data-free ratios to it (the ranking inside a
    layer is the data-free one, the level across layers the solver's)."""
    torch.manual_seed(0)
    weight, x = torch.randn(16, 64), torch.randn(400, 64)
    x[:, :8] *= 6  # a few loud inputs: GPTQ's compensation then differs clearly from RTN's
    stats = HessianStats.empty(64)
    stats.update(x)
    settings = dict(bits=[2, 3, 4], group_sizes=[32, -1], lowrank_energy=[], dense=False,
                    sparse_bits=[0, 4])  # fmt: skip
    free = measure_layer(weight, stats, CandidateGrid(**settings, solver_scaled=False))
    scaled = measure_layer(weight, stats, CandidateGrid(**settings))
    for kind in ("quant", "sparse"):
        pairs = [(f, s) for f, s in zip(free, scaled) if f.candidate.kind == kind]
        anchor = sorted(pairs, key=lambda p: p[0].error)[len(pairs) // 2]
        solved = solver_error(anchor[0], weight, stats, 0.01)
        assert anchor[1].error == pytest.approx(solved, rel=1e-6)
        assert solved < 0.9 * anchor[0].error  # the solver does better than rounding
        ratio = anchor[1].error / anchor[0].error
        assert all(s.error == pytest.approx(f.error * ratio, rel=1e-6) for f, s in pairs)


def test_the_plan_spends_bytes_where_the_loss_is_sensitive(planned):
    """Given that the loss cares 10⁶ times more about one layer's outputs, a tight budget keeps
    that layer more precise than any other: weights move bytes between layers."""
    model, calib, _ = planned
    sens = output_sensitivity(model, calib)
    precious = list(sens)[3]
    sens[precious] = sens[precious] * 1e6
    planner = Planner(model, measure_model(model, calib, CandidateGrid(), sensitivity=sens))
    plan = planner.for_avg_bits(3.0)
    bits = {r["layer"]: r["bits"] for r in plan.rows()}
    assert bits[precious] == max(bits.values()) > min(bits.values())


def test_the_frontier_shows_what_each_byte_buys(planned):
    """The stage's picture: plans across the whole size range predict less error the more bytes
    they get, and every uniform setting sits on or above that frontier (the knapsack is exact)."""
    from presso.orchestrator.budget import frontier

    model, calib, planner = planned
    chosen = planner.for_bytes(75_000)
    series = frontier(planner, chosen, points=8)
    sweep = sorted(series["budget plans"])
    assert len(sweep) >= 6 and all(a[1] >= b[1] for a, b in zip(sweep, sweep[1:]))
    assert series["this plan"] == [(chosen.artifact_bytes / 1e6, chosen.total_error)]
    assert len(series["uniform settings"]) >= 8
    offered = {o.candidate for opts in planner.options for o in opts if o.format}
    for uniform in filter(None, map(planner.uniform, offered)):
        plan = planner.for_bytes(uniform.artifact_bytes)
        assert plan.total_error <= uniform.total_error * (1 + 1e-9)
