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
    if "dense_ppl" in s or "artifact_bytes" in s:
        table = Table(title="test split", title_justify="left")
        table.add_column("")
        table.add_column("dense", justify="right")
        table.add_column(s.get("method", "compressed"), justify="right")
        table.add_row("perplexity", _num(s.get("dense_ppl")), _num(s.get("compressed_ppl")))
        table.add_row("bytes", _mb(s.get("dense_bytes")), _mb(s.get("artifact_bytes")))
        table.add_row("bits / weight (compressed layers)", "32", _num(s.get("avg_bits"), ".3f"))
        console.print(table)
    if "artifact" in s:
        console.print(f"artifact: {s['artifact']}")
    if "model_version" in s:
        alias = "champion" if s.get("champion") else "candidate"
        console.print(f"registered: {s['registered_model']} version {s['model_version']} ({alias})")
    console.print(f"MLflow run {s.get('run_id')} at {s.get('tracking_uri')}")
