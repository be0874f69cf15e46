"""The registered model: an MLflow pyfunc ("models from code") around a packed presso artifact.

The model version holds the packed artifact itself (small), not a pickle of the model, and loads
it with ``presso.load_compressed`` — checksums verified — wherever it is served.
``predict`` takes token ids (a list of lists, or a DataFrame with an ``input_ids`` column) and
returns the next-token logits of each sequence.
"""

import mlflow
import torch


class PackedModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import presso

        self.model = presso.load_compressed(context.artifacts["packed"])

    def predict(self, context, model_input, params=None):
        rows = model_input["input_ids"] if hasattr(model_input, "columns") else model_input
        with torch.no_grad():
            return [self.model(torch.tensor([list(ids)])).logits[0, -1].tolist() for ids in rows]


mlflow.models.set_model(PackedModel())
