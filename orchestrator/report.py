"""The summary a run prints at the end: what was trained, what the compression cost and saved."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _mb(n: float | None) -> str:
    return "—" if n is None else f"{n / 1e6:,.2f} MB"


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "—" if x is None else format(x, fmt)


def print_summary(s: dict, console: Console | None = None) -> None:
    console = console or Console(width=100)
    if "steps" in s:
        console.print(
            f"[bold]train[/bold]: {s['steps']} steps in {s['train_s']:.0f} s, final train loss "
            f"{_num(s.get('train_loss'))}, val loss {_num(s.get('val_loss_start'))} → "
            f"{_num(s.get('val_loss'))}"
        )
    if "recover_steps" in s:
        verdict = "kept" if s.get("recovery_kept") else "worse on val: the original is kept"
        console.print(
            f"[bold]recover[/bold]: {s['recover_steps']} steps in {s['recover_s']:.0f} s, val "
            f"perplexity {_num(s.get('recover_val_ppl_before'))} → "
            f"{_num(s.get('recover_val_ppl_after'))} ({verdict})"
        )
    columns = [("dense", "dense")] if "dense_ppl" in s or "dense_bytes" in s else []
    if "compressed_ppl" in s or "artifact_bytes" in s:
        columns.append((s.get("method", "compressed"), "compressed"))
    if "recovered_ppl" in s:
        columns.append(("recovered", "recovered"))
    if columns:
        tokens = f" ({s['eval_tokens']:,} tokens)" if "eval_tokens" in s else ""
        table = Table(title=f"test split{tokens}", title_justify="left")
        table.add_column("")
        for title, _ in columns:
            table.add_column(title, justify="right")
        size = {
            "dense": s.get("dense_bytes"),
            "compressed": s.get("artifact_bytes"),
            "recovered": s.get("recovered_bytes"),
        }
        bits = {"dense": 32.0, "compressed": s.get("avg_bits"), "recovered": s.get("avg_bits")}
        rows = {
            "perplexity": lambda k: _num(s.get(f"{k}_ppl")),
            "bytes": lambda k: _mb(size[k]),
            "bits / weight (compressed layers)": lambda k: _num(
                bits[k], ".3g" if k == "dense" else ".3f"
            ),
            "tokens / s": lambda k: _num(s.get(f"{k}_tokens_per_s"), ",.0f"),
        }
        for label, cell in rows.items():
            table.add_row(label, *(cell(kind) for _, kind in columns))
        console.print(table)
    if "artifact" in s:
        console.print(f"artifact: {s['artifact']}")
    if "model_version" in s:
        alias = "champion" if s.get("champion") else "candidate"
        console.print(f"registered: {s['registered_model']} version {s['model_version']} ({alias})")
    console.print(f"MLflow run {s.get('run_id')} at {s.get('tracking_uri')}")
