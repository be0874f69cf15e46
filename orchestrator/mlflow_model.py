"""The registered model: an MLflow pyfunc ("models from code") around a packed presso artifact.

The model version holds the packed artifact itself (small), not a pickle of the model, and loads
it with ``presso.load_compressed`` — checksums verified — wherever it is served.
``predict`` takes token ids (a list of lists; its type hints are the model's signature) and
returns the next-token logits of each sequence.
"""

import mlflow
import torch


class PackedModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import presso

        self.model = presso.load_compressed(context.artifacts["packed"])

    def predict(self, context, model_input: list[list[int]], params=None) -> list[list[float]]:
        with torch.no_grad():
            return [self.model(torch.tensor([ids])).logits[0, -1].tolist() for ids in model_input]


mlflow.models.set_model(PackedModel())
