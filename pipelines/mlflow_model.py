"""The registered model, as MLflow models-from-code: this file is the model.

``pipelines.registry`` logs it with ``mlflow.pyfunc.log_model(python_model=<this file>,
artifacts={"checkpoint": <checkpoint.pt>}, code_paths=[<fcn_core>])``. Loading the model
runs this file (MLflow executes it from the model's folder) and ``load_context`` rebuilds the
net from the checkpoint's JSON ``arch`` and reads its weights with
``torch.load(weights_only=True)``: nothing is unpickled. So this file imports only what a
model's user has: mlflow, numpy, torch and the shipped ``fcn_core``, never ``pipelines``.

The images the net was trained on, stacked (N, H, W, C), any H and W, in (uint8 RGB; for
NYUD's nets uint8 HHA, uint16 RGB + depth in mm, or uint8 RGB + HHA: the version's ``input``
tag and its signature say which); int64 class ids (N, H, W) out (the first head of a
multi-head net).
"""

from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class FCNSegmenter(PythonModel):
    """``fcn_core.serving.SegmentationModel`` behind MLflow's pyfunc interface."""

    def load_context(self, context: Any) -> None:
        from fcn_core.serving import load_checkpoint, serving_model

        # A local file MLflow downloaded with the model (not a data location).
        with open(context.artifacts["checkpoint"], "rb") as f:
            state = load_checkpoint(f)
        self.model = serving_model(state)

    # np.ndarray: a type hint MLflow infers no schema from (the logged signature, e.g. uint8
    # (-1, -1, -1, 3) -> int64 (-1, -1, -1), is the schema) and does not warn about.
    def predict(self, context: Any, model_input: np.ndarray, params: Any = None
                ) -> np.ndarray:
        from fcn_core.serving import predict_ids

        return predict_ids(self.model, model_input)


mlflow.models.set_model(FCNSegmenter())
