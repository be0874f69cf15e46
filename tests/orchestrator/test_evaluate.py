"""Perplexity is exp(mean NLL) over non-overlapping windows, checked against a hand computation."""

import math

import torch

from presso.orchestrator.evaluate import perplexity


class Bigram(torch.nn.Module):
    """A model whose next-token distribution depends only on the current token: easy by hand."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, ids):
        class Out:
            logits = self.table[ids]

        return Out


def test_perplexity_matches_hand_computation():
    torch.manual_seed(0)
    table = torch.randn(5, 5)
    tokens = torch.tensor([0, 1, 2, 3, 4, 0, 2, 4, 1, 3, 3])  # 11 tokens → 3 windows of 3
    logp = torch.log_softmax(table, dim=-1)
    nll = []
    for w in range(3):
        window = tokens[3 * w : 3 * w + 3]
        for i in range(1, 3):  # each window predicts its 2nd and 3rd token
            nll.append(-logp[window[i - 1], window[i]].item())
    result = perplexity(Bigram(table), tokens, seq_len=3, batch_size=2)
    assert result.tokens == 6
    assert math.isclose(result.nll, sum(nll) / 6, rel_tol=1e-6)
    assert math.isclose(result.perplexity, math.exp(sum(nll) / 6), rel_tol=1e-6)


def test_max_tokens_limits_the_windows():
    table = torch.zeros(5, 5)  # uniform: perplexity is the vocabulary size
    result = perplexity(Bigram(table), torch.zeros(100, dtype=torch.long), 10, max_tokens=30)
    assert result.tokens == 27
    assert math.isclose(result.perplexity, 5.0, rel_tol=1e-6)
