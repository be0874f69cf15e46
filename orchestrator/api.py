"""``presso.compress``: the compress stage in one call, for a notebook or a script.

    import presso
    small = presso.compress(model, [{"gptq": {"bits": 4, "group_size": 64}}],
                            calibration=my_texts, tokenizer=tokenizer, output="model-w4")

It runs the pipeline's own compress path (:func:`~presso.orchestrator.compress.run_compression`,
the one block loop, the registry's algorithms; :func:`~presso.orchestrator.budget.run_budget`
for a budget): in this process by default, or on ``workers`` Ray actors (a local Ray, or the
cluster at $RAY_ADDRESS). No MLflow, no job file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import fields
from types import SimpleNamespace

import torch

from presso import ConfigError, DataError
from presso.compressors.plan.planner import BudgetConfig

BUDGET_KEYS = {f.name for f in fields(BudgetConfig)}


def compress(
    model: torch.nn.Module,
    recipe_or_budget,
    calibration: Sequence | torch.Tensor | None = None,
    tokenizer=None,
    workers: int = 0,
    output: str | os.PathLike | None = None,
    *,
    ignore: Sequence[str] = ("lm_head",),
    seq_len: int = 512,
    batch_size: int = 8,
    architecture=None,
    dtype: str | torch.dtype = "auto",
) -> torch.nn.Module:
    """A compressed copy of ``model`` (a Hugging Face causal LM; ``model`` is left untouched)
    whose compressed linears keep their weights packed — what ``presso.load_compressed`` of the
    artifact gives.

    ``recipe_or_budget``: an algorithm name (``"gptq"``: its defaults, see ``presso algorithms``),
    one ``{name: {setting: value}}`` entry or algorithm object, a recipe list of them, or a budget
    ``{"bytes": "40MB"}`` / ``{"avg_bits": 3.5}`` (per-layer settings chosen by the planner).
    ``calibration``, for the algorithms that need data: texts (tokenized with ``tokenizer``, cut
    into windows of ``seq_len`` tokens, each starting with BOS where the tokenizer uses one), or
    token ids — batches ``[B, T]``, or one ``[N, T]`` tensor cut into batches of ``batch_size``.
    ``workers``: 0 compresses in this process; N > 0 on N Ray actors. ``output``: also write the
    artifact folder there (with ``tokenizer``). ``architecture``: a description for a model type
    presso does not know (:mod:`presso.compressors.ptq.architectures`). ``dtype``: how the
    tensors presso does not compress are stored (default: the model's half precision); the
    returned model holds their stored values, in the model's own dtype.
    """
    from presso.compressors.formats.artifact import kept_tensors, save_compressed, storage_dtype
    from presso.orchestrator.compress import plan_layers, run_compression

    if workers < 0:
        raise ConfigError(f"workers: expected 0 (this process) or more Ray actors, got {workers}")
    # everything is checked before Ray or any worker starts
    budget = _budget(recipe_or_budget)
    batches = _batches(calibration, tokenizer, seq_len, batch_size)
    if budget is None:
        recipe = _recipe(recipe_or_budget)
        layers = plan_layers(model, recipe, ignore, architecture)
    if (budget is not None or recipe.needs_data) and not batches:
        raise DataError(
            "presso.compress: this calibrates on data; pass calibration= texts (with "
            "tokenizer=) or token ids"
        )
    if budget is not None and architecture is not None:
        raise ConfigError(
            "architecture: a budget plan finds layers by the registered descriptions only; "
            "register yours (register_architecture(model_type, description)) instead"
        )
    if workers:
        _start_ray(workers)
    if budget is None:
        result = run_compression(model, recipe, workers, list(ignore), None, batches, plan=layers)
    else:
        result = _compress_to_budget(model, budget, batches, tokenizer, workers, ignore)
    store = storage_dtype(result.model, dtype)
    if output is not None:
        save_compressed(result.model, result.records, output, tokenizer, dtype=store)
    with torch.no_grad():  # what the artifact holds: the kept tensors rounded to their storage
        for t in kept_tensors(result.model, result.records).values():
            if t.is_floating_point():
                t.copy_(t.to(store))
    return _packed(result.model, result.records)


def _budget(spec) -> BudgetConfig | None:
    if isinstance(spec, BudgetConfig):
        budget = spec
    elif isinstance(spec, Mapping) and spec and set(spec) <= BUDGET_KEYS:
        budget = BudgetConfig(**spec)
    else:
        return None
    budget.validate("budget")
    if budget.max_ppl_increase_pct is not None:
        raise ConfigError(
            "budget: max_ppl_increase_pct measures held-out text of the corpus; from Python give "
            "bytes or avg_bits, or run a job file with `presso compress`"
        )
    return budget


def _recipe(spec):
    from presso.compressors.ptq.recipe import Recipe

    if isinstance(spec, str):
        spec = {spec: {}}
    if isinstance(spec, Mapping) or not isinstance(spec, Sequence):
        spec = [spec]
    return Recipe.parse(spec, "recipe")


def _batches(calibration, tokenizer, seq_len: int, batch_size: int) -> list | None:
    """Calibration batches from texts, token batches or one ``[N, T]`` tensor."""
    if calibration is None:
        return None
    if isinstance(calibration, torch.Tensor):
        return list(calibration.long().split(batch_size))
    calibration = list(calibration)
    if not calibration or not all(isinstance(c, str) for c in calibration):
        return calibration  # batches of token ids (or dicts of model inputs) as they are
    if tokenizer is None:
        raise ConfigError("calibration: texts need tokenizer= to become token ids")
    return text_windows(calibration, tokenizer, seq_len, batch_size)


def text_windows(texts: list[str], tokenizer, seq_len: int, batch_size: int) -> list:
    """The texts as one token stream cut into windows of ``seq_len`` tokens (one window of all
    of them when they are shorter), each led by BOS where the model needs it (``window_bos``)."""
    from presso.orchestrator.data import window_bos, windows

    stream = [t for text in texts for t in tokenizer(text, add_special_tokens=False).input_ids]
    bos = window_bos(tokenizer)
    if not stream or seq_len - (bos is not None) < 1:
        raise DataError("calibration: the texts hold no tokens")
    seq_len = min(seq_len, len(stream) + (bos is not None))
    return list(windows(torch.tensor(stream), seq_len, bos=bos).split(batch_size))


def _start_ray(workers: int) -> None:
    from presso.orchestrator.cluster import ensure_ray, wait_for_resources
    from presso.orchestrator.config import PressoConfig

    cfg = PressoConfig()
    ensure_ray(cfg)
    wait_for_resources(cfg, workers, 0, f"presso.compress(workers={workers})")


def _compress_to_budget(model, budget: BudgetConfig, batches, tokenizer, workers, ignore):
    from presso.orchestrator.budget import check_budget, run_budget
    from presso.orchestrator.config import PressoConfig

    cfg = PressoConfig()
    cfg.compress.budget, cfg.compress.workers, cfg.compress.ignore = budget, workers, list(ignore)
    check_budget(cfg, model, tokenizer)
    plan = SimpleNamespace(
        model=model, calibration=batches, layers=None, tokenizer=tokenizer, source=None
    )
    return run_budget(cfg, plan, None)[0]


def _packed(model: torch.nn.Module, records: dict) -> torch.nn.Module:
    """``model`` with each recorded layer replaced by its stored format's runtime module, as
    ``load_compressed`` builds them (a quantized embedding's tensors shared by a tied head)."""
    from presso.compressors.formats.loading import replace_module, runtime_module, tie_head

    for name, record in records.items():
        target = model.get_submodule(name)
        bias = getattr(target, "bias", None)
        bias = None if bias is None else bias.detach()
        layer = {"format": record.format, "scheme": record.scheme()}
        dtype = target.weight.dtype
        replace_module(
            model, name, runtime_module(model, name, layer, record.tensors(), bias, dtype)
        )
    tie_head(model, records)
    return model.eval()
