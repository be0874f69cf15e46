"""The registered model: an MLflow pyfunc ("models from code") around a packed presso artifact.

The model version holds the packed artifact itself (small), not a pickle of the model, and loads
it with ``presso.load_compressed`` — checksums verified — wherever it is served, computing in
fp32 on the CPU (fp16 CPU matmuls are slow) and in the stored half dtype on a GPU.
``predict`` takes token ids (a list of lists; its type hints are the model's signature) and
returns the next-token logits of each sequence.
"""

import mlflow
import torch


class PackedModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import presso

        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = None if device == "cuda" else torch.float32
        self.model = presso.load_compressed(context.artifacts["packed"], dtype=dtype, device=device)

    def predict(self, context, model_input: list[list[int]], params=None) -> list[list[float]]:
        device = next(self.model.buffers()).device
        with torch.no_grad():
            return [
                self.model(torch.tensor([ids], device=device)).logits[0, -1].float().tolist()
                for ids in model_input
            ]


mlflow.models.set_model(PackedModel())
