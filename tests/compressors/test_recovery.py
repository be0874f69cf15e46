"""Recovery maths: a compressed layer learns only its continuous parts, never its codes or mask,
starts exactly where the artifact is, and exports records of the same format, dtypes and size."""

import copy

import pytest
import torch

from presso import ConfigError
from presso.compressors.formats.lowrank import LowRankWeight
from presso.compressors.ptq.calibration import HessianStats
from presso.compressors.recovery import (
    export_records,
    kd_loss,
    make_recoverable,
    recoverable,
)
from presso.compressors.registry import build

# One recipe per stored format the recovery stage handles.
RECIPES = {
    "rtn-sym": ("rtn", {"bits": 3, "group_size": 32}),
    "rtn-asym": ("rtn", {"bits": 3, "group_size": 32, "symmetric": False}),
    "sparsegpt-2:4": ("sparsegpt", {"pattern": "2:4"}),
    "sparsegpt-50%": ("sparsegpt", {"sparsity": 0.5}),
    "sparsegpt-2:4+w4": ("sparsegpt", {"pattern": "2:4", "bits": 4, "group_size": 32}),
    "sparsegpt-50%+w4-asym": (
        "sparsegpt",
        {"sparsity": 0.5, "bits": 4, "group_size": 32, "symmetric": False},
    ),
    "spqr": ("spqr", {"bits": 3, "group_size": 16, "outlier_fraction": 0.02}),
}


def _records(model, recipe: str) -> dict:
    name, params = RECIPES[recipe]
    algo = build(name, params)
    torch.manual_seed(1)
    records = {}
    for layer, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and layer != "lm_head":
            stats = HessianStats.empty(m.in_features)
            stats.update(torch.randn(256, m.in_features))
            records[layer] = algo.compress(m.weight.detach(), stats, name=layer)
    return records


def _same_tensors(a, b) -> bool:
    ta, tb = a.tensors(), b.tensors()
    return ta.keys() == tb.keys() and all(
        ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta
    )


def _fixed_tensors(record) -> dict:
    """What recovery must never change: codes, masks, outlier positions, stored shapes."""
    fixed = ("weight_packed", "weight_values", "weight_positions", "bitmask", "shape")
    fixed += ("weight_shape", "row_offsets", "scale_packed", "zero_packed", "outlier_row_ptr")
    fixed += ("outlier_col_idx",)
    return {k: v for k, v in record.tensors().items() if k in fixed}


def _distill(student, teacher, steps: int, lr: float = 1e-2) -> list[float]:
    torch.manual_seed(2)
    ids = torch.randint(0, 96, (8, 24))
    with torch.no_grad():
        target = teacher(ids).logits
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = kd_loss(student(ids).logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("recipe", RECIPES)
def test_starts_where_the_artifact_is_and_exports_it_unchanged(tiny_llama, recipe):
    """Before any step the recoverable layer computes the record's own dequantized weight, and
    exporting it untouched gives back the very tensors that were stored: recovery with zero steps
    is the identity on the artifact."""
    records = _records(tiny_llama, recipe)
    student = make_recoverable(copy.deepcopy(tiny_llama), records, ["scales", "zeros", "norms"])
    for name, record in records.items():
        assert torch.equal(student.get_submodule(name).weight(), record.dequantize().float())
    for name, exported in export_records(student, records).items():
        assert type(exported) is type(records[name])
        assert _same_tensors(exported, records[name])


@pytest.mark.parametrize("recipe", RECIPES)
def test_training_moves_only_the_chosen_parts_and_never_codes_or_masks(tiny_llama, recipe):
    """Every learnable part is switched on and trained hard; the exported records must still hold
    the same codes, masks and outlier positions, in the same dtypes and shapes (so the artifact is
    the same size to the byte), while the continuous parts did move."""
    records = _records(tiny_llama, recipe)
    learn = ["scales", "zeros", "norms", "sparse_values"]
    student = make_recoverable(copy.deepcopy(tiny_llama), records, learn)
    _distill(student, tiny_llama, steps=5, lr=5e-2)
    moved = 0
    for name, exported in export_records(student, records).items():
        before, after = records[name].tensors(), exported.tensors()
        assert {k: (v.dtype, v.shape) for k, v in after.items()} == {
            k: (v.dtype, v.shape) for k, v in before.items()
        }
        fixed_before, fixed_after = _fixed_tensors(records[name]), _fixed_tensors(exported)
        assert all(torch.equal(fixed_before[k], fixed_after[k]) for k in fixed_before), name
        moved += not _same_tensors(exported, records[name])
    assert moved == len(records)


def test_only_the_chosen_kind_of_parameter_moves(tiny_llama):
    """learn=[scales] on a quantized model: scales move, norms and zero points stay bit-exact,
    and every dense parameter outside the compressed layers (embeddings, lm_head) is frozen."""
    records = _records(tiny_llama, "rtn-asym")
    student = make_recoverable(copy.deepcopy(tiny_llama), records, ["scales"])
    dense_before = {n: p.detach().clone() for n, p in student.named_parameters()}
    _distill(student, tiny_llama, steps=5)
    for name, p in student.named_parameters():
        changed = not torch.equal(p, dense_before[name])
        assert changed == name.endswith(".scale"), name
    for name, exported in export_records(student, records).items():
        assert torch.equal(exported.zero, records[name].zero)


def test_learned_zero_points_stay_integers_on_the_grid(tiny_llama):
    records = _records(tiny_llama, "rtn-asym")
    student = make_recoverable(copy.deepcopy(tiny_llama), records, ["zeros"])
    _distill(student, tiny_llama, steps=20, lr=0.5)
    changed = 0
    for name, exported in export_records(student, records).items():
        assert exported.zero.dtype == torch.int32
        assert exported.zero.min() >= -4 and exported.zero.max() <= 3  # 3-bit grid
        changed += not torch.equal(exported.zero, records[name].zero)
    assert changed > 0


@pytest.mark.parametrize("recipe", ["rtn-sym", "sparsegpt-2:4", "spqr"])
def test_distillation_lowers_the_kl_to_the_teacher(tiny_llama, recipe):
    """On a tiny model 40 steps of KD on its continuous parts cut the KL by at least 40 %
    (measured: RTN W3 ÷5, SparseGPT 2:4 ÷50, SpQR ÷1.9)."""
    records = _records(tiny_llama, recipe)
    learn = ["scales", "norms", "sparse_values"]
    student = make_recoverable(copy.deepcopy(tiny_llama), records, learn)
    losses = _distill(student, tiny_llama, steps=40, lr=1e-3)
    print(f"{recipe}: KL {losses[0]:.4g} -> {losses[-1]:.4g}")
    assert losses[-1] < 0.6 * losses[0]


def test_kd_loss_is_zero_on_the_teacher_and_positive_elsewhere():
    logits = torch.randn(2, 5, 11)
    assert kd_loss(logits, logits).abs().item() < 1e-6
    assert kd_loss(logits + torch.randn_like(logits), logits).item() > 0


def test_a_format_with_nothing_to_learn_stays_frozen():
    record = LowRankWeight(torch.randn(8, 2).half(), torch.randn(2, 16).half())
    module = recoverable(record, None, ["scales", "sparse_values"])
    assert not any(p.requires_grad for p in module.parameters())
    assert module.export() is record


def test_unknown_learnable_is_refused(tiny_llama):
    with pytest.raises(ConfigError, match="choose from"):
        make_recoverable(tiny_llama, {}, ["scale"])


@pytest.mark.parametrize("recipe", ["rtn-asym", "sparsegpt-2:4+w4", "spqr"])
def test_recovered_artifact_is_the_same_size_and_reads_back(tiny_llama, tmp_path, recipe):
    """Saved after training, the weights file is the same size to the byte as the original's;
    ``read_records`` returns exactly the exported records, and the settings are recorded."""
    import json

    from presso.compressors.formats.artifact import WEIGHTS, read_records, save_compressed

    records = _records(tiny_llama, recipe)
    save_compressed(tiny_llama, records, tmp_path / "before")
    student = make_recoverable(copy.deepcopy(tiny_llama), records, ["scales", "sparse_values"])
    _distill(student, tiny_llama, steps=3)
    learned = export_records(student, records)
    save_compressed(tiny_llama, learned, tmp_path / "after", metadata={"recovery": {"steps": 3}})
    sizes = {(tmp_path / d / WEIGHTS).stat().st_size for d in ("before", "after")}
    assert len(sizes) == 1
    for name, record in read_records(tmp_path / "after").items():
        assert _same_tensors(record, learned[name])
    config = json.loads((tmp_path / "after" / "config.json").read_text())
    assert config["quantization_config"]["presso"]["recovery"] == {"steps": 3}
