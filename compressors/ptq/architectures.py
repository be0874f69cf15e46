"""What the block loop and AWQ need to know about a decoder architecture, declared per model type.

    arch = architecture_of(model)          # from model.config.model_type; unknown types fail
    prefix, blocks = arch.find_blocks(model)

An :class:`Architecture` says where the decoder blocks are, which linears of a block read the
same input (q/k/v, gate/up) and which module produces that input (the norm or linear whose output
channels AWQ divides by its scales), and how the embeddings and the head are named. Nothing is
guessed from module names: a model type without a description is refused up front, with the
message saying how to describe it. To compress another architecture, describe it and either pass
it (``compress_model(..., architecture=arch)``, ``presso.compress(..., architecture=arch)``) or
register it for its ``model_type`` (``register_architecture("mytype", arch)``)::

    Architecture(
        blocks="model.layers",
        groups=[("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"])],
    )

A group ``(prev, linears)`` is only valid when each linear's input is ``prev``'s output times
something linear in it: a norm right before the linears, a linear feeding them through nothing
(v → o: attention mixes rows), through a product (up → down: ``act(gate) · up``) or through a
positively homogeneous activation (OPT's fc1 → ReLU → fc2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from presso import ConfigError, UnsupportedError


@dataclass(frozen=True)
class Architecture:
    """A decoder architecture's layout; module names relative to the model (``blocks``,
    ``embeddings``, ``lm_head``) or to one block (``groups``, ``no_clip``)."""

    blocks: str  # the nn.ModuleList of decoder blocks, e.g. "model.layers"
    # (module producing a shared input, the linears reading it); see the module docstring
    groups: Sequence[tuple[str, Sequence[str]]] = ()
    no_clip: Sequence[str] = ()  # linears AWQ leaves unclipped (q/k: the softmax amplifies)
    norm_offset: float = 0.0  # the block's norms scale by (norm_offset + weight); Gemma: 1
    # False where hidden states outgrow fp16 (max 65,504): half precision must then be bf16
    fits_fp16: bool = True
    # the input embedding and the output head: one tensor when the config ties them
    embeddings: str = "model.embed_tokens"
    lm_head: str = "lm_head"

    def __post_init__(self):  # tuples throughout, so a description is hashable and immutable
        groups = tuple((prev, tuple(names)) for prev, names in self.groups)
        object.__setattr__(self, "groups", groups)
        object.__setattr__(self, "no_clip", tuple(self.no_clip))

    @classmethod
    def from_dict(cls, d: dict, prefix: str = "model.architecture") -> Architecture:
        """A description from a job file's mapping; unknown or missing keys fail naming them."""
        keys = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - keys)
        if unknown or "blocks" not in d:
            what = f"unknown keys {unknown}" if unknown else "blocks is required"
            raise ConfigError(f"{prefix}: {what}; the keys are {sorted(keys)}")
        groups = d.get("groups") or []
        if any(not isinstance(g, Sequence) or len(g) != 2 or isinstance(g, str) for g in groups):
            raise ConfigError(f"{prefix}.groups: expected [[producer, [linear, ...]], ...]")
        return cls(**d)

    def find_blocks(self, model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
        """``(path, blocks)``; raises when the model does not have them where declared."""
        try:
            blocks = model.get_submodule(self.blocks)
        except AttributeError:
            blocks = None
        if not isinstance(blocks, torch.nn.ModuleList) or not len(blocks):
            raise UnsupportedError(
                f"{type(model).__name__}: no decoder blocks at {self.blocks!r}, where its "
                f"architecture description puts them; fix the description's blocks path"
            )
        return self.blocks, blocks

    def check(self, model: torch.nn.Module) -> None:
        """Every module the description names exists in the model (in the first block)."""
        _, blocks = self.find_blocks(model)
        named = dict(blocks[0].named_modules())
        wanted = {n for prev, names in self.groups for n in (prev, *names)} | set(self.no_clip)
        missing = sorted(n for n in wanted if n not in named)
        if missing:
            raise UnsupportedError(
                f"{type(model).__name__}: its architecture description names {missing}, which "
                f"the first block at {self.blocks!r} does not have; fix the description"
            )


LLAMA = Architecture(
    blocks="model.layers",
    groups=[
        ("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
        ("self_attn.v_proj", ["self_attn.o_proj"]),  # only where shapes match (no grouped KV)
        ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),
        ("mlp.up_proj", ["mlp.down_proj"]),
    ],
    no_clip=["self_attn.q_proj", "self_attn.k_proj"],
)
# Gemma: the MLP reads pre_feedforward_layernorm (post_attention_layernorm normalises the attention
# output before the residual add), and its RMSNorms scale by (1 + weight). Its residual stream
# outgrows fp16 (Gemma-3-270M: max |hidden state| 1.0e5 by block 15 on Hamlet; NaN in fp16).
GEMMA2 = Architecture(
    blocks="model.layers",
    groups=[
        LLAMA.groups[0],
        LLAMA.groups[1],
        ("pre_feedforward_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),
        LLAMA.groups[3],
    ],
    no_clip=LLAMA.no_clip,
    norm_offset=1.0,
    fits_fp16=False,
)
# Phi-3 fuses q/k/v and gate/up into one linear each: v → o and up → down would fold into a
# slice of a fused layer's rows, which a group cannot say, so only the norm groups are scaled.
PHI3 = Architecture(
    blocks="model.layers",
    groups=[
        ("input_layernorm", ["self_attn.qkv_proj"]),
        ("post_attention_layernorm", ["mlp.gate_up_proj"]),
    ],
    no_clip=["self_attn.qkv_proj"],
)
OPT_LAYERS = "model.decoder.layers"
OPT_LINEAR_GROUPS = [("self_attn.v_proj", ["self_attn.out_proj"]), ("fc1", ["fc2"])]  # ReLU
OPT_NORM_GROUPS = [
    ("self_attn_layer_norm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
    ("final_layer_norm", ["fc1"]),
]


def _opt(config) -> Architecture:
    """OPT normalises before each sublayer except in post-norm variants (opt-350m), where the
    norms act on the outputs and cannot take a fold; fc1 → fc2 folds through ReLU only."""
    groups = [OPT_LINEAR_GROUPS[0]]
    if getattr(config, "do_layer_norm_before", True):
        groups += OPT_NORM_GROUPS
    if getattr(config, "activation_function", "relu") == "relu":
        groups.append(OPT_LINEAR_GROUPS[1])
    return Architecture(
        blocks=OPT_LAYERS,
        groups=groups,
        no_clip=["self_attn.q_proj", "self_attn.k_proj"],
        embeddings="model.decoder.embed_tokens",
    )


# model_type → its description, or a function of the config for types with variants.
ARCHITECTURES: dict[str, Architecture | Callable[[object], Architecture]] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,  # its q/k norms act after the projections, inside the attention
    "gemma2": GEMMA2,
    "gemma3_text": GEMMA2,
    "phi3": PHI3,
    "opt": _opt,
}

HOW_TO_DESCRIBE = (
    "describe it with presso.compressors.ptq.architectures.Architecture(blocks=<path of the "
    "nn.ModuleList of decoder blocks>, groups=[(<norm or linear>, [<linears reading its "
    "output>]), ...]) and pass it as architecture=... (in a job file: model.architecture: "
    "{blocks: ..., groups: [...]}), or register it for its model_type with "
    "register_architecture(<model_type>, <description>) (see the README, 'Other architectures')"
)


def register_architecture(
    model_type: str, description: Architecture | Callable[[object], Architecture]
) -> None:
    """Make ``model_type`` (a Hugging Face config's ``model_type``) compressible."""
    ARCHITECTURES[model_type] = description


def registered(model: torch.nn.Module) -> Architecture | None:
    """The registered description of the model's ``model_type``, or None."""
    config = getattr(model, "config", None)
    found = ARCHITECTURES.get(getattr(config, "model_type", None))
    return found if found is None or isinstance(found, Architecture) else found(config)


def architecture_of(
    model: torch.nn.Module, architecture: Architecture | None = None
) -> Architecture:
    """``architecture`` if given, else the registered description of the model's config's
    ``model_type``; checked against the model either way."""
    if architecture is None:
        architecture = registered(model)
        if architecture is None:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            what = f"model_type {model_type!r}" if model_type else "a model without a HF config"
            raise UnsupportedError(
                f"{type(model).__name__} ({what}): no architecture description; presso knows "
                f"{sorted(ARCHITECTURES)}. To compress it, {HOW_TO_DESCRIBE}"
            )
    architecture.check(model)
    return architecture
