"""Evaluation: test-split perplexity, model bytes and tokens per second."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from presso.orchestrator.data import windows


@dataclass
class EvalResult:
    perplexity: float
    nll: float  # mean token negative log-likelihood (nats)
    tokens: int  # predicted tokens the mean is over
    tokens_per_s: float


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    seq_len: int,
    max_tokens: int | None = None,
    batch_size: int = 8,
    progress=None,
    bos: int | None = None,
) -> EvalResult:
    """exp(mean token NLL) over non-overlapping windows of ``seq_len`` tokens.

    Each window predicts its tokens 2..seq_len from the ones before them inside the window, so
    the first token of every window is context only and the mean is over ``seq_len - 1`` tokens
    per window. With ``bos`` (models that need it, :func:`~presso.orchestrator.data.window_bos`)
    that first token is ``bos`` and every token of the split is predicted.
    """
    model.eval()
    device = next(model.parameters()).device
    batches = windows(tokens, seq_len, max_tokens, bos).split(batch_size)
    total_nll, total_tokens, start = 0.0, 0, time.perf_counter()
    for batch in batches if progress is None else progress(batches):
        batch = batch.to(device)
        logits = model(batch[:, :-1]).logits.float()
        nll = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    elapsed = time.perf_counter() - start
    mean = total_nll / total_tokens
    return EvalResult(math.exp(mean), mean, total_tokens, total_tokens / elapsed)
