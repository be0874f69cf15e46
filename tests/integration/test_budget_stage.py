"""The compress stage under a budget, end to end on Ray: measured on the workers, planned, solved,
saved to exactly the planned size within the budget, and logged (table, JSON, heat map)."""

import json

import pytest
from mlflow.tracking import MlflowClient

from presso.compressors.formats.artifact_size import ArtifactSizer
from presso.compressors.plan.candidates import CandidateGrid
from presso.compressors.plan.planner import min_artifact_bytes
from presso.orchestrator.config import load_config
from presso.orchestrator.data import ByteTokenizer
from presso.orchestrator.pipeline import run_pipeline

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sources(tmp_path_factory, make_llama):
    """A tiny byte-level Llama saved as a model folder, and a four-work corpus."""
    root = tmp_path_factory.mktemp("budget")
    corpus = root / "corpus"
    corpus.mkdir()
    for name in ("alpha", "beta", "gamma", "delta"):
        (corpus / f"{name}_gut.txt").write_text(f"{name}: to be or not to be, that is it. " * 60)
    model = make_llama(vocab_size=256)
    model.save_pretrained(root / "model")
    ByteTokenizer().save_pretrained(root / "model")
    return model, root


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=4, include_dashboard=True, logging_level="WARNING")
    yield
    ray.shutdown()


def _run(sources, tmp_path, budget: list[str]):
    model, root = sources
    cfg = load_config(
        "jobs/smollm2_budget.yaml",
        [
            f"model.source={root / 'model'}",
            f"data.path={root / 'corpus'}",
            "data.val_works=[beta]",
            "data.test_works=[gamma]",
            "compress.budget.bytes=null",
            *budget,
            "compress.calibration={samples: 8, seq_len: 32, batch_size: 4, shards: 2}",
            "eval.seq_len=32",
            "eval.max_tokens=512",
            f"run.output_dir={tmp_path}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.register=false",
        ],
    )
    summary = run_pipeline(cfg, ("compress", "eval"))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("smollm2-budget").experiment_id])
    compress = next(r for r in runs if r.data.tags.get("presso.stage") == "compress")
    return summary, client, compress


def test_byte_budget_end_to_end(sources, tmp_path, ray_session, capsys):
    """A budget between the smallest and the dense artifact: the written folder is exactly the
    planned size, within the budget, and the plan is printed and logged with its heat map."""
    model, _ = sources
    tokenizer = ByteTokenizer()
    low = min_artifact_bytes(model, CandidateGrid(), ["lm_head"], tokenizer)
    high = ArtifactSizer(model, tokenizer).total({})
    budget = low + (high - low) // 4
    summary, client, compress = _run(sources, tmp_path, [f"compress.budget.bytes={budget}"])

    assert summary["artifact_bytes"] <= budget
    assert summary["artifact_bytes"] == compress.data.metrics["compress/planned_artifact_bytes"]
    assert summary["method"].startswith("budget plan: ")
    assert summary["compressed_ppl"] > 1
    out = capsys.readouterr().out
    assert "pred. error" in out and "model.layers.1.mlp.down_proj" in out
    run_id = compress.info.run_id
    files = {a.path for a in client.list_artifacts(run_id)}
    assert {"budget_plan.txt", "budget_plan.json"} <= files
    plots = [a.path for a in client.list_artifacts(run_id, "plots")]
    assert plots == ["plots/budget_frontier.png", "plots/budget_plan.png"]
    rows = json.loads(open(client.download_artifacts(run_id, "budget_plan.json")).read())["rows"]
    assert len(rows) == 15 and sum(r["bytes"] for r in rows) > 0  # 14 linears, the embedding
    assert rows[-1]["layer"] == "model.embed_tokens"


def test_perplexity_budget_searches_on_held_out_windows(sources, tmp_path, ray_session):
    """max_ppl_increase_pct: each search step is solved on the workers and measured on the
    validation split; the chosen plan's measurement met the target and is logged."""
    summary, client, compress = _run(
        sources,
        tmp_path,
        [
            "compress.budget.max_ppl_increase_pct=20",
            "compress.budget.search_steps=2",
            "compress.budget.search_tokens=256",
        ],
    )
    run_id = compress.info.run_id
    search = json.loads(open(client.download_artifacts(run_id, "budget_plan.json")).read())
    search = search["search"]
    assert len(search["steps"]) == 2
    assert search["target_ppl"] == pytest.approx(1.2 * search["base_ppl"])
    chosen = [h for h in search["steps"] if h["artifact_bytes"] == summary["artifact_bytes"]]
    assert chosen and all(h["ppl"] <= search["target_ppl"] for h in chosen)
