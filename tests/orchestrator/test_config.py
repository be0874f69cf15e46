"""Config errors must surface before any worker starts, naming the key the user has to fix."""

import pytest

from presso import ConfigError
from presso.orchestrator.config import load_config

JOB = "jobs/quickstart.yaml"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.steps=abc", "train.steps: expected int, got 'abc'"),
        ("train.stepz=3", "train.stepz: unknown key"),
        ("train.use_gpu=maybe", "train.use_gpu: expected bool, got 'maybe'"),
        ("train.steps=0", "train.steps: must be > 0, got 0"),
        ("train.optimizer.lr=-1", "train.optimizer.lr: must be > 0"),
        ("eval.seq_len=-5", "eval.seq_len: must be > 0"),
        ("compress.recipe=[{rtn: {bits: 9}}]", "compress.recipe[0].rtn.bits: must be in [2, 8]"),
        ("compress.recipe=[{rtn: {bitz: 4}}]", "compress.recipe[0].rtn.bitz: unknown setting"),
        ("compress.recipe=[{nope: {}}]", "compress.recipe[0]: unknown algorithm 'nope'"),
        ("compress.recipe=[{rtn:{bits:4}}]", "compress.recipe: value"),
        ("model.scratch.num_heads=3", "model.scratch: hidden_size must be a multiple"),
        ("data.test_works=[hamlet]", "data.test_works: ['hamlet'] also in data.val_works"),
        ("data.tokenizer=words", "data.tokenizer: expected auto, bytes or smollm2"),
        ("trainsteps", "expected key=value"),
        ("compress.dtype=float8", "compress.dtype: expected one of"),
        (
            "compress.recipe=[{embedding: {bits: 8}}, {embedding: {bits: 4}}, {rtn: {}}]",
            "compress.recipe: more than one embedding entry",
        ),
        (
            "compress.recipe=[{rtn: {}}, {embedding: {bits: 9}}]",
            "compress.recipe[1].embedding.bits: must be in [2, 8]",
        ),
    ],
)
def test_bad_override_names_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(JOB, [override])
    assert message in str(err.value)


def test_bad_yaml_file_names_the_line(tmp_path):
    job = tmp_path / "bad.yaml"
    job.write_text("train:\n  steps: [1,\n")
    with pytest.raises(ConfigError, match=r"not valid YAML \(line"):
        load_config(job)


def test_yaml_unknown_section(tmp_path):
    job = tmp_path / "bad.yaml"
    job.write_text("trian:\n  steps: 3\n")
    with pytest.raises(ConfigError, match="trian: unknown key"):
        load_config(job)


def test_missing_job_file(tmp_path):
    with pytest.raises(ConfigError, match="no such job file"):
        load_config(tmp_path / "absent.yaml")


def test_overrides_apply_on_top_of_the_job():
    cfg = load_config(JOB, ["train.steps=7", "compress.recipe=[{rtn: {bits: 3, group_size: 32}}]"])
    assert cfg.train.steps == 7
    [entry] = cfg.compress.recipe
    assert list(entry) == ["rtn"]
    # the overridden settings, with the algorithm's defaults filled in around them
    assert entry["rtn"] | {"bits": 3, "group_size": 32, "symmetric": True} == entry["rtn"]
    assert cfg.model.source == "scratch"  # from the job file


def test_every_shipped_job_validates():
    """A job spec in jobs/ that does not load would fail only when a user tries it."""
    from pathlib import Path

    jobs = sorted(Path("jobs").glob("*.yaml"))
    assert jobs
    for job in jobs:
        load_config(job)


def test_job_files_are_bounded_in_size_and_must_be_text(tmp_path):
    """A wrong file passed as the job (a log, a data dump) costs a second, not gigabytes."""
    from presso.orchestrator.config import MAX_JOB_BYTES

    big = tmp_path / "big.yaml"
    big.write_text("train:\n" + "  # padding\n" * (MAX_JOB_BYTES // 12 + 1))
    with pytest.raises(ConfigError, match=r"big\.yaml: [\d,]+ bytes, but a job file is at most"):
        load_config(big)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(128, 256)))
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(binary)


def test_embedding_entry_may_stand_anywhere_in_the_recipe():
    """The embedding entry runs after the solver wherever it is listed; it is kept apart."""
    from presso.compressors.ptq import Recipe
    from presso.orchestrator.config import recipe_algorithms

    for recipe in ("[{embedding: {}}, {gptq: {}}]", "[{gptq: {}}, {embedding: {}}]"):
        cfg = load_config(JOB, [f"compress.recipe={recipe}"])
        parsed = Recipe.parse(recipe_algorithms(cfg))
        assert parsed.solver.name == "gptq" and parsed.embedding.bits == 8


def test_budget_with_an_embedding_entry_is_refused():
    """A budget plan replaces the recipe and does not plan the embedding: refused up front."""
    recipe = "compress.recipe=[{rtn: {}}, {embedding: {}}]"
    with pytest.raises(ConfigError, match="compress.budget: the budget planner does not plan"):
        load_config(JOB, [recipe, "compress.budget.avg_bits=4"])


def test_storage_dtype_auto_follows_the_declared_dtype(tmp_path):
    """A bf16 checkpoint is loaded in fp32 (its config then says float32), so `auto` reads the
    folder's config.json: bf16 stays bf16; anything else, and a scratch model, is fp16."""
    import json

    from presso.orchestrator.models import storage_dtype

    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    assert storage_dtype("auto", tmp_path) == "bfloat16"
    assert storage_dtype("float32", tmp_path) == "float32"
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float32"}))
    assert storage_dtype("auto", tmp_path) == "auto"  # save_compressed: fp16 for an fp32 model
    assert storage_dtype("auto", None) == "auto"
