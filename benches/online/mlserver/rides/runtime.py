"""Peer for benches/online_load.sh: MLServer with a custom onnxruntime runtime for the ride model.

MLServer speaks the Open Inference Protocol, as sluice does; with adaptive batching on (see
model-settings.json) it merges concurrent requests into one model run. MLServer has no built-in
ONNX runtime, so this is the custom runtime its docs describe: load an onnxruntime session, decode
the request's tensors with NumpyCodec, run, encode the prediction.
"""
import os

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class RidesRuntime(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        path = os.environ.get("MODEL", "models/rides/model.onnx")
        self._session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self._dtypes = {i.name: (np.int64 if i.type == "tensor(int64)" else np.float32) for i in self._session.get_inputs()}
        self._output = self._session.get_outputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {}
        for t in payload.inputs:
            feeds[t.name] = NumpyCodec.decode_input(t).astype(self._dtypes[t.name]).reshape(-1, 1)
        (out,) = self._session.run([self._output], feeds)
        prediction = out.reshape(-1).astype(np.float64)
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("prediction", prediction)])
