"""Peer for benches/online_load.sh: FastAPI + uvicorn + onnxruntime, one request per model run.

The stack a Python team would write first (and the job-API seed used): each HTTP request decodes
its Open Inference Protocol JSON, runs the ride model on its own rows with onnxruntime, and
answers in the protocol's JSON. Same model file, same requests and the same load generator as
sluice. Run: uvicorn --workers 2 --app-dir benches/online fastapi_rides:app --port 8001
(MODEL=path/to/model.onnx).
"""
import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

options = ort.SessionOptions()
options.intra_op_num_threads = 1
session = ort.InferenceSession(os.environ.get("MODEL", "models/rides/model.onnx"), options, providers=["CPUExecutionProvider"])
DTYPES = {i.name: (np.int64 if i.type == "tensor(int64)" else np.float32) for i in session.get_inputs()}
OUTPUT = session.get_outputs()[0].name
app = FastAPI()


@app.post("/v2/models/rides/infer")
async def infer(request: Request):
    body = await request.json()
    feeds = {}
    for t in body["inputs"]:
        feeds[t["name"]] = np.asarray(t["data"], dtype=DTYPES[t["name"]]).reshape(-1, 1)
    (out,) = session.run([OUTPUT], feeds)
    preds = out.reshape(-1).astype(float).tolist()
    response = {"model_name": "rides", "outputs": [{"name": "prediction", "datatype": "FP64", "shape": [len(preds)], "data": preds}]}
    if "id" in body:
        response["id"] = body["id"]
    return JSONResponse(response)
