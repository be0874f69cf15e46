"""Quantization of the token embedding and the output head (``lm_head``): an opt-in recipe entry.

They are a small model's largest tensors (SmolLM2-135M: 28 M of its 135 M weights, one matrix
when tied), and every PTQ recipe leaves them dense. This entry rounds them to nearest on the
same grid the other quantizers use, groups along the hidden dimension, which is the input
dimension of ``lm_head`` and the row of an embedding lookup alike, so one record serves both:
a tied pair stays one stored tensor. It may sit anywhere in a recipe; it runs after the layer
solver, on the model's embedding as it is (no calibration data)::

    recipe: [{gptq: {bits: 4, group_size: 64}}, {embedding: {bits: 8, group_size: 64}}]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from presso.compressors.formats.quantized import QuantizedWeight
from presso.compressors.quant.primitives import GridSettings
from presso.compressors.quant.rtn import RTN
from presso.compressors.registry import register


@register("embedding")
@dataclass
class EmbeddingQuant(GridSettings):
    """Round-to-nearest of the embedding and lm_head (opt-in; tied weights stay one tensor)."""

    bits: int = 8
    group_size: int = 64

    quantizes_embeddings = True  # what a recipe looks for (it is neither solver nor transform)

    def embedding_layers(self, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """The modules this entry quantizes: the input embedding, and the output head unless it
        is tied to it (then the embedding's record serves both)."""
        names = {id(m): n for n, m in model.named_modules()}
        inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
        layers = {names[id(inputs)]: inputs}
        if outputs is not None and outputs.weight is not inputs.weight:
            layers[names[id(outputs)]] = outputs
        return layers

    def check_shapes(self, model: torch.nn.Module) -> None:
        for name, module in self.embedding_layers(model).items():
            self.check_shape(*module.weight.shape, name)

    def compress_embeddings(self, model: torch.nn.Module) -> dict[str, QuantizedWeight]:
        """Records of the embedding (and an untied lm_head); the model's weights are replaced by
        their dequantized values, as the layer solvers leave theirs."""
        rtn = RTN(**self.grid_settings())
        records = {}
        for name, module in self.embedding_layers(model).items():
            records[name] = rtn.compress(module.weight.detach(), name=name)
            with torch.no_grad():
                module.weight.copy_(records[name].dequantize().to(module.weight.dtype))
        return records
