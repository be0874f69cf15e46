"""compressed-tensors (through transformers) reads Presso's pack-quantized artifacts."""

import pytest
import torch

from presso.compressors.formats.artifact import save_compressed
from presso.compressors.ptq.blocks import compress_model

pytest.importorskip("compressed_tensors")


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
@pytest.mark.parametrize("symmetric", [True, False])
def test_compressed_tensors_decompresses_our_gptq_artifact(tiny_llama, tmp_path, symmetric):
    """Interoperability claim of the artifact: a GPTQ model saved by Presso loads in the
    compressed-tensors stack, and its decompressed weights are exactly ours: computed in the
    scales' dtype, fp16, by compressed-tensors 0.20, and in fp32 by 0.19 (the version
    llm-compressor 0.14 pins), so either rounding of our values, bit for bit."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    torch.set_num_threads(1)
    calib = [torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))]
    grid = {"bits": 4, "group_size": 32, "symmetric": symmetric}
    records = compress_model(tiny_llama, [{"gptq": grid}], calib)
    save_compressed(tiny_llama, records, tmp_path / "art")
    theirs = AutoModelForCausalLM.from_pretrained(
        tmp_path / "art", quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    for name, record in records.items():
        w = theirs.get_submodule(name).weight.detach().float()
        ours = record.dequantize().float()
        assert torch.equal(w, ours.half().float()) or torch.equal(w, ours), name
