"""OptimizerConfig: bad values fail naming their key, the structured config loads in OmegaConf,
and ``build_optimizer`` puts the right weights on the low-rank path."""

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from presso import ConfigError
from presso.compressors.optim import (
    GaLoreAdamW,
    GradNormLoRP,
    OptimizerConfig,
    build_optimizer,
    low_rank_parameters,
)


@pytest.mark.parametrize(
    "field,value",
    [
        ("name", "sgd"),
        ("lr", 0.0),
        ("betas", [0.9]),
        ("eps", -1.0),
        ("weight_decay", -0.1),
        ("rank", 0),
        ("update_proj_gap", 0),
        ("scale", 0.0),
        ("proj_type", "diagonal"),
        ("svd", "lanczos"),
        ("moments_on_switch", "drop"),
        ("state_code", "fp4"),
        ("projector_dtype", "float16"),
        ("modules", []),
    ],
)
def test_validate_names_the_key(field, value):
    """A user fixing a job spec needs the full key of the bad value, not a traceback."""
    cfg = OptimizerConfig(**{field: value})
    with pytest.raises(ConfigError, match=rf"^train\.optimizer\.{field}: "):
        cfg.validate("train.optimizer")


def test_defaults_validate_and_load_as_structured_config():
    """The dataclass must be an OmegaConf structured config (the orchestrator merges YAML into
    it), and a wrongly typed override must fail there, before any worker starts."""
    OptimizerConfig().validate("train.optimizer")
    schema = OmegaConf.structured(OptimizerConfig)
    merged = OmegaConf.merge(schema, OmegaConf.create({"name": "galore8bit", "rank": 64}))
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, OptimizerConfig) and cfg.rank == 64 and cfg.eight_bit
    with pytest.raises(Exception, match="rank"):
        OmegaConf.merge(schema, OmegaConf.create({"rank": "big"}))


class _TinyLM(nn.Module):
    """Embedding tied to lm_head, two Linear layers, a norm."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(50, 16)
        self.attn = nn.Linear(16, 16)
        self.mlp = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(16)
        self.lm_head = nn.Linear(16, 50, bias=False)
        self.lm_head.weight = self.embed_tokens.weight


def test_default_selection_skips_lm_head_and_embeddings():
    """By default every Linear weight goes low-rank except the output head and embeddings
    (tied ones included): their rows are token-indexed and projecting them hurts."""
    model = _TinyLM()
    assert set(low_rank_parameters(model, ["*"], OptimizerConfig().exclude)) == {
        "attn.weight",
        "mlp.weight",
    }
    assert set(low_rank_parameters(model, ["mlp"], [])) == {"mlp.weight"}


@pytest.mark.parametrize(
    "name,cls",
    [
        ("adamw", torch.optim.AdamW),
        ("galore", GaLoreAdamW),
        ("galore8bit", GaLoreAdamW),
        ("gradnormlorp", GradNormLoRP),
        ("gradnormlorp8bit", GradNormLoRP),
    ],
)
def test_build_optimizer_covers_every_parameter_once(name, cls):
    """Every trainable parameter must be optimized exactly once (a tied weight too), and only
    the chosen weights in the low-rank group."""
    model = _TinyLM()
    opt = build_optimizer(OptimizerConfig(name=name), model)
    assert type(opt) is cls
    seen = [p for group in opt.param_groups for p in group["params"]]
    assert len(seen) == len({id(p) for p in seen}) == len(list(model.parameters()))
    if cls is not torch.optim.AdamW:
        low = [p for g in opt.param_groups if g["low_rank"] for p in g["params"]]
        assert {id(p) for p in low} == {id(model.attn.weight), id(model.mlp.weight)}
        assert opt.defaults["eight_bit"] == name.endswith("8bit")


def test_no_matching_module_is_a_config_error():
    """A pattern that matches nothing would silently train with plain AdamW; it must fail."""
    with pytest.raises(ConfigError, match=r"^train\.optimizer\.modules: "):
        build_optimizer(OptimizerConfig(name="galore", modules=["decoder.*"]), _TinyLM())
