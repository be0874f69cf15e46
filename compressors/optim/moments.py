"""Adam's moment update, and how a moment is kept between steps (fp32, or 8-bit block codes).

A quantized moment ``key`` lives in the optimizer state as ``state[key]`` (uint8 codes) plus
``state[key + "_absmax"]`` (fp32, one per block); its presence is what marks it quantized, so a
resumed optimizer decodes exactly what it saved.
"""

from __future__ import annotations

import math

import torch

from presso.compressors.optim.quant8 import dequantize_blockwise, quantize_blockwise

# Moments smaller than this stay fp32: 8 bits save little there and norms/biases are sensitive.
MIN_8BIT_NUMEL = 4096


def _signed(key: str) -> bool:
    """The second moment (``*exp_avg_sq``) is non-negative and uses the unsigned code book."""
    return not key.endswith("exp_avg_sq")


def adam_direction(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    betas: tuple[float, float],
    eps: float,
) -> torch.Tensor:
    """Fold ``grad`` into the moments (in place) and return the bias-corrected Adam direction
    ``m_hat / (sqrt(v_hat) + eps)`` for step number ``step`` (1-based), in torch.optim.AdamW's
    operation order so that the dense path matches it to rounding."""
    beta1, beta2 = betas
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    return (exp_avg / denom).div_(1 - beta1**step)


def read_moment(state: dict, key: str, code: str) -> torch.Tensor:
    """The fp32 moment ``key``: the stored tensor itself, or a decoded copy when it is 8-bit."""
    absmax = state.get(key + "_absmax")
    if absmax is None:
        return state[key]
    return dequantize_blockwise(state[key], absmax, code, _signed(key))


def write_moment(state: dict, key: str, value: torch.Tensor, code: str, eight_bit: bool) -> None:
    """Store ``value`` as moment ``key``, block-quantized when ``eight_bit`` and large enough."""
    if eight_bit and value.numel() >= MIN_8BIT_NUMEL:
        state[key], state[key + "_absmax"] = quantize_blockwise(value, code, _signed(key))
    else:
        state[key] = value
        state.pop(key + "_absmax", None)


def init_moments(
    state: dict, like: torch.Tensor, code: str, eight_bit: bool, prefix: str = ""
) -> None:
    """Zero first and second moments ``prefix + exp_avg[_sq]`` shaped like ``like``."""
    for key in ("exp_avg", "exp_avg_sq"):
        zeros = torch.zeros_like(like, dtype=torch.float32, memory_format=torch.contiguous_format)
        write_moment(state, prefix + key, zeros, code, eight_bit)


def adam_step_moments(
    state: dict, grad: torch.Tensor, step: int, group: dict, eight_bit: bool, prefix: str = ""
) -> torch.Tensor:
    """One Adam step on the moments ``prefix + exp_avg[_sq]`` stored in ``state``: returns the
    direction for ``grad``. ``group`` supplies ``betas``, ``eps`` and ``state_code``."""
    code = group["state_code"]
    exp_avg = read_moment(state, prefix + "exp_avg", code)
    exp_avg_sq = read_moment(state, prefix + "exp_avg_sq", code)
    direction = adam_direction(grad, exp_avg, exp_avg_sq, step, group["betas"], group["eps"])
    if eight_bit:
        write_moment(state, prefix + "exp_avg", exp_avg, code, eight_bit)
        write_moment(state, prefix + "exp_avg_sq", exp_avg_sq, code, eight_bit)
    return direction
