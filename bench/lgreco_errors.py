"""Does L-GreCo's error budget predict what compression does to the loss?

    python bench/lgreco_errors.py [--quick]

L-GreCo chooses per-layer settings with a knapsack over squared compression errors: it assumes
that a larger budgeted error hurts the loss more, across candidates and across layers alike. This
checks that on the training ``bench/gradcomp.py`` runs (the quickstart Llama, its batches, its
AdamW and learning-rate schedule, presso's DDP engine):

1. ``warm`` dense steps from the seed's init (past the learning-rate warm-up);
2. for each family, each probed layer and each candidate: ``steps`` more steps with only that
   layer's gradient compressed by presso's communicator exactly as training runs it (its DDP comm
   hook on a one-worker gloo group: error feedback, PowerSGD's warm-started ``Q`` and one power
   step, top-k, stochastic rounding), every other layer exact, on the same batches as a dense
   continuation from the same state;
3. budgeted error: the communicator's own candidate error (what L-GreCo's table holds) on the
   layer's error-compensated gradient, summed over the steps; loss effect: val loss after the
   steps minus the dense continuation's. Two more errors for comparison (``ERRORS``): the
   squared error the exchange really kept back, and that error in AdamW's update.

Spearman's rho of each against the loss effect, pooled over (layer, candidate) per family, and
across layers at each candidate: the comparison the knapsack makes when it moves bytes from one
layer to another.
Writes ``bench/results/lgreco_errors{_quick}.{json,txt}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from gradcomp import GC, QUICK_MODEL
from harness import RESULTS, ROOT, Log, load_average, median, rank_correlation

from presso.compressors.gradient.config import FAMILIES
from presso.compressors.gradient.powersgd import PowerSGD
from presso.orchestrator.config import load_config
from presso.orchestrator.data import (
    ByteTokenizer,
    build_corpus,
    load_works,
    split_works,
    train_batch,
    windows,
)
from presso.orchestrator.engine import DDPEngine
from presso.orchestrator.models import build_scratch
from presso.orchestrator.train import lr_at

FULL = dict(warm=60, steps=6, eval_batches=8, blocks=(0, 3))
QUICK = dict(warm=4, steps=2, eval_batches=1, blocks=(0,))
# A spread over each family's default L-GreCo candidates (ranks 1-32, densities 0.001-0.1,
# bits 2/3/4/8), weakest compression last.
CANDIDATES = {"powersgd": (1, 4, 16), "topk": (0.001, 0.01, 0.1), "quant": (2, 3, 4)}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Probe:
    """The warm state and the batches every continuation shares."""

    def __init__(self, s: dict, quick: bool) -> None:
        self.s, self.base = s, QUICK_MODEL if quick else []
        self.cfg = self.config([])
        t = self.cfg.train
        works = load_works(self.cfg.data.path)
        splits = split_works(works, self.cfg.data.val_works, self.cfg.data.test_works)
        corpus = build_corpus(works, splits, ByteTokenizer())
        self.tokens = corpus.train
        self.val = windows(corpus.val, t.seq_len + 1)[: s["eval_batches"] * t.batch_size]
        self.state, self.optimizer_state = None, None
        engine = self.engine(self.cfg)
        self.train(engine, range(s["warm"]))
        self.state = {k: v.clone() for k, v in engine.model.state_dict().items()}
        self.optimizer_state = copy.deepcopy(engine.optimizer.state_dict())
        self.layers = ["model.embed_tokens.weight"] + [
            f"model.layers.{b}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}.weight"
            for b in s["blocks"]
            for p in PROJECTIONS
        ]

    def config(self, overrides: list[str]):
        return load_config(ROOT / "jobs/quickstart.yaml", [*self.base, *overrides])

    def engine(self, cfg) -> DDPEngine:
        """A fresh model, from the warm state once there is one, in presso's DDP engine."""
        model = build_scratch(
            cfg.model.scratch, ByteTokenizer.vocab_size, cfg.train.seq_len, cfg.run.seed
        )
        if self.state is not None:
            model.load_state_dict(self.state)
        engine = DDPEngine(model, cfg.train, torch.device("cpu"))
        if self.optimizer_state is not None:
            # the optimizer steps its state in place: each continuation gets its own copy
            engine.optimizer.load_state_dict(copy.deepcopy(self.optimizer_state))
        return engine

    def train(self, engine: DDPEngine, steps: range) -> None:
        t, seed = self.cfg.train, self.cfg.run.seed
        for step in steps:
            batch = train_batch(self.tokens, step, 0, 1, t.batch_size, t.seq_len, seed)
            logits = engine(batch[:, :-1]).float()
            loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            engine.step(loss, lr_at(step, t))

    @torch.no_grad()
    def val_loss(self, model) -> float:
        logits = torch.cat([model(b[:, :-1]).logits.float() for b in self.val.split(8)])
        return F.cross_entropy(logits.flatten(0, 1), self.val[:, 1:].flatten()).item()

    def continuation(self, family: str | None = None, layer: str = "", value=None) -> dict:
        """Val loss after ``steps`` more steps with only ``layer`` compressed at ``value`` (no
        family: dense), and the layer's errors summed over those steps (see ``ERRORS``)."""
        overrides = [f"{GC}.warmup_steps=0"]
        if family is not None:
            param = FAMILIES.get(family, "family").config.parameter
            overrides += [f"{GC}.method=uniform", f"{GC}.family={family}", f"{GC}.{param}={value}"]
        engine = self.engine(self.config(overrides))
        errors = dict.fromkeys(ERRORS, 0.0)
        if family is not None:
            comm, weight = engine.comm, engine.model.get_parameter(layer)
            comm.choice = {layer: comm.family.clamp(comm.shapes[layer], value)}  # this layer only
            name = (
                "_exchange_low_rank" if isinstance(comm.family, PowerSGD) else "_exchange_gathered"
            )
            exchange = getattr(comm, name)

            def recording(layers, inputs):
                x = inputs[layer]  # the error-compensated gradient the compressor takes
                errors["budget"] += comm._errors(
                    layer, x.view(comm.shapes[layer]), [comm.choice[layer]]
                )[0]
                means, shares = exchange(layers, inputs)
                residual = x - shares[layer]  # what error feedback keeps back this step
                errors["realized"] += float(residual.double().square().sum())
                errors["adam"] += float((residual / adam_denominator(engine.optimizer, weight))
                                        .double().square().sum())  # fmt: skip
                return means, shares

            setattr(comm, name, recording)
        warm = self.s["warm"]
        self.train(engine, range(warm, warm + self.s["steps"]))
        return {"val_loss": self.val_loss(engine.model), **errors}


# What each probe sums over its steps: L-GreCo's budgeted error (the communicator's own estimate,
# before the exchange), the squared error the exchange really kept back, and that error divided
# coordinate-wise by AdamW's denominator (sqrt of the bias-corrected second moment + eps), i.e.
# the error in the update AdamW takes, which is what moves the loss.
ERRORS = ("budget", "realized", "adam")


def adam_denominator(optimizer: torch.optim.Optimizer, weight: torch.Tensor) -> torch.Tensor:
    """AdamW's per-coordinate divisor of ``weight``'s update, flat, as of the last step."""
    state, group = optimizer.state[weight], optimizer.param_groups[0]
    beta2, step = group["betas"][1], float(state["step"])
    return ((state["exp_avg_sq"] / (1 - beta2**step)).sqrt() + group["eps"]).reshape(-1)


def correlations(points: list[dict], key: str) -> dict:
    """Spearman's rho of ``key`` against the loss effect: pooled, and across layers per
    candidate."""
    groups = {"pooled": points}
    for value in sorted({p["value"] for p in points}):
        groups[str(value)] = [p for p in points if p["value"] == value]
    return {
        name: rank_correlation([p[key] for p in group], [p["effect"] for p in group])
        for name, group in groups.items()
    }


def exchange_rates(points: list[dict]) -> dict[str, float]:
    """Median loss effect per unit of budgeted error, by where the layer sits (the embedding,
    each probed block). The knapsack assumes one rate for every layer: equal total error, equal
    loss."""
    groups: dict[str, list[float]] = {}
    for p in points:
        where = "embedding" if "embed" in p["layer"] else f"block {p['layer'].split('.')[2]}"
        if p["budget"] > 0:
            groups.setdefault(where, []).append(p["effect"] / p["budget"])
    return {where: median(rates) for where, rates in groups.items()}


def summary(report: dict) -> list[str]:
    s, quick = report["settings"], report["settings"]["steps"] == QUICK["steps"]
    families = {k: v for k, v in report.items() if k in CANDIDATES}
    layers = len({p["layer"] for r in families.values() for p in r["points"]})
    lines = [
        f"Spearman's rho of each error against the loss effect: {layers} layers, one at a time "
        f"compressed for {s['steps']} steps after {s['warm']} dense ones (quickstart Llama"
        f"{', quick: tiny' if quick else ''}); pooled over layers and candidates, then across "
        "layers at each candidate. budget: L-GreCo's; realized: the squared error the exchange "
        "kept back; adam: that error in AdamW's update (divided by its denominator)"
    ]
    for family, r in families.items():
        for key, rho in r["rho"].items():
            per = ", ".join(f"{k} {v:+.3f}" for k, v in rho.items() if k != "pooled")
            lines.append(f"{family:>9} {key:>8}: pooled {rho['pooled']:+.3f} over "
                         f"{len(r['points'])}; across layers at {per}")  # fmt: skip
    lines.append("loss effect per unit of budgeted error (median over candidates and layers):")
    for family, r in families.items():
        rates = exchange_rates(r["points"])
        lines.append(f"{family:>9}: " + ", ".join(f"{k} {v:.3g}" for k, v in rates.items()))
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, a few steps")
    parser.add_argument("--report", action="store_true", help="re-render the summary from JSON")
    args = parser.parse_args(argv)
    s = QUICK if args.quick else FULL
    out = RESULTS / f"lgreco_errors{'_quick' if args.quick else ''}.json"
    tick, log = time.perf_counter(), Log()
    if args.report:  # the probes' own lines stay
        ran = out.with_suffix(".txt").read_text().splitlines()
        for line in ran[: ran.index("")]:
            log(line)
        log()
        for line in summary(json.loads(out.read_text())):
            log(line)
        log(ran[-1])  # the load and time of the run
        log.save(out.with_suffix(".txt"))
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    probe = Probe(s, args.quick)
    dense = probe.continuation()["val_loss"]
    log(f"dense continuation: val loss {dense:.5f} after {s['warm']} + {s['steps']} steps")
    report = {"settings": s, "dense_val_loss": dense}
    for family, values in CANDIDATES.items():
        points = []
        for layer in probe.layers:
            for value in values:
                r = probe.continuation(family, layer, value)
                points.append({"layer": layer, "value": value, "effect": r["val_loss"] - dense,
                               **{k: r[k] for k in ERRORS}})  # fmt: skip
                log(
                    f"{family} {value} {layer}: loss effect {points[-1]['effect']:+.5f}, "
                    + ", ".join(f"{k} {r[k]:.4g}" for k in ERRORS)
                )
        report[family] = {"points": points, "rho": {k: correlations(points, k) for k in ERRORS}}
    dist.destroy_process_group()
    log()
    for line in summary(report):
        log(line)
    log(f"load average {load_average():.1f}; total {time.perf_counter() - tick:.0f} s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    log.save(out.with_suffix(".txt"))


if __name__ == "__main__":
    sys.exit(main())
