"""The Open Inference Protocol's reference client, tritonclient[http], against `sluice serve`.

Used by tests/online.rs. Reads rows (JSON lines: {"id": ..., <inputs>}) and asks the server for
their answers the way a Triton user would, once with binary tensors (the client's default) and
once with JSON data, and prints one JSON line per row and mode: {"mode", "id", <outputs>,
"model_version"}. Before that it checks the server is live, the model ready, and prints the
model's metadata as the client reads it.

usage: triton_client.py HOST:PORT MODEL ROWS.csv [BATCH]
"""
import csv
import json
import sys

import numpy as np
import tritonclient.http as httpclient

url, model, rows_path = sys.argv[1], sys.argv[2], sys.argv[3]
batch = int(sys.argv[4]) if len(sys.argv) > 4 else 16
rows = list(csv.DictReader(open(rows_path, newline="", encoding="utf-8")))
client = httpclient.InferenceServerClient(url=url)
assert client.is_server_live(), "server not live"
assert client.is_model_ready(model), "model not ready"
meta = client.get_model_metadata(model)
print(json.dumps({"metadata": meta}), flush=True)
inputs_meta = meta["inputs"]
# Rows a stream would dead-letter (a missing or empty input) are left out: `sluice run` gives
# them no answer, and over the protocol they would fail their whole batch.
rows = [r for r in rows if all((r.get(i["name"]) or "").strip() for i in inputs_meta)]
outputs_meta = meta["outputs"]

NP = {"BYTES": np.object_, "FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}

for binary in (True, False):
    mode = "binary" if binary else "json"
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        inputs = []
        for spec in inputs_meta:
            name, dt = spec["name"], spec["datatype"]
            cast = {"BYTES": lambda v: v.encode(), "INT64": lambda v: int(float(v)), "INT32": lambda v: int(float(v))}.get(dt, float)
            values = [cast(r[name]) for r in chunk]
            arr = np.array(values, dtype=NP[dt])
            t = httpclient.InferInput(name, [len(chunk)], dt)
            t.set_data_from_numpy(arr, binary_data=binary)
            inputs.append(t)
        outputs = [httpclient.InferRequestedOutput(o["name"], binary_data=binary) for o in outputs_meta]
        result = client.infer(model, inputs, outputs=outputs, request_id=f"{mode}-{start}")
        response = result.get_response()
        assert response.get("id") == f"{mode}-{start}", response
        columns = {o["name"]: result.as_numpy(o["name"]) for o in outputs_meta}
        for i, r in enumerate(chunk):
            line = {"mode": mode, "id": r["id"], "model_version": response["model_version"]}
            for name, arr in columns.items():
                v = arr[i]
                if isinstance(v, bytes):
                    v = v.decode()
                elif isinstance(v, np.generic):
                    v = v.item()
                line[name] = v
            print(json.dumps(line), flush=True)
