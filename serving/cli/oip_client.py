"""A small Open Inference Protocol client for `serving predict --protocol v2|grpc`.

It turns v1-style instances into tensors using the model's metadata (so a feature-backed
model gets one 1-D tensor per instance field, any other model one stacked tensor per
input), sends them over REST (JSON `data`) or gRPC (raw contents), and returns the
answer as the REST v2 JSON object either way.
"""

from __future__ import annotations

from typing import Any

import grpc
import httpx
import numpy as np
import orjson

from serving.errors import ServingError
from serving.transport import oip


class OipClientError(Exception):
    """A request that could not be made or was answered with an error."""


def to_tensors(inputs: list[dict[str, Any]], instances: Any) -> list[tuple[str, str, np.ndarray]]:
    """(name, datatype, array) per model input, from a list of instances."""
    if not isinstance(instances, list) or not instances:
        raise OipClientError("instances must be a non-empty JSON list")
    names = [t["name"] for t in inputs]
    columns: dict[str, list[Any]] = {n: [] for n in names}
    for i, inst in enumerate(instances):
        if isinstance(inst, dict):
            extra = sorted(set(inst) - set(names))
            if extra:
                raise OipClientError(
                    f"instances[{i}]: unknown field {extra[0]!r} (the model takes "
                    f"{', '.join(names)})"
                )
            for n in names:
                if n not in inst:
                    raise OipClientError(
                        f"instances[{i}]: missing {n!r} (the model takes {', '.join(names)})"
                    )
                columns[n].append(inst[n])
        elif len(names) == 1:
            columns[names[0]].append(inst)
        else:
            raise OipClientError(
                f"instances[{i}]: expected an object with fields {', '.join(names)}"
            )
    out: list[tuple[str, str, np.ndarray]] = []
    for t in inputs:
        name, datatype, values = t["name"], t["datatype"], columns[t["name"]]
        if datatype == "BYTES":
            values = [v if isinstance(v, str) else str(v) for v in values]
        try:
            shaped = np.asarray(values, dtype=object if datatype == "BYTES" else None)
            flat = shaped.reshape(-1).tolist()
            arr = oip.decode_values(name, datatype, list(shaped.shape), flat)
        except ValueError:
            raise OipClientError(f"{name}: instances differ in shape") from None
        except ServingError as exc:
            raise OipClientError(exc.message) from None
        out.append((name, datatype, arr))
    return out


def predictions(body: dict[str, Any]) -> list[Any]:
    """One prediction per instance from a v2 answer: a bare value for one output, else
    an object of named outputs."""
    arrays = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in body["outputs"]}
    rows = len(next(iter(arrays.values()))) if arrays else 0
    if len(arrays) == 1:
        (arr,) = arrays.values()
        return [arr[i].tolist() for i in range(rows)]
    return [{n: a[i].tolist() for n, a in arrays.items()} for i in range(rows)]


# ---- REST ------------------------------------------------------------------------------
def _rest_error(resp: httpx.Response) -> OipClientError:
    try:
        message = resp.json()["error"]
    except (ValueError, KeyError, TypeError):
        message = resp.text[:500]
    code = resp.headers.get("x-serving-error-code", "")
    return OipClientError(f"{resp.status_code} {code}: {message}".replace("  ", " "))


def predict_rest(
    url: str, model: str, version: str | None, instances: Any, timeout_s: float = 30.0
) -> tuple[dict[str, Any], str]:
    """(v2 answer, server-timing) from `POST /v2/models/.../infer` with JSON tensors."""
    base = f"{url}/v2/models/{model}" + (f"/versions/{version}" if version else "")
    try:
        with httpx.Client(timeout=timeout_s) as client:
            meta = client.get(base)
            if meta.status_code != 200:
                raise _rest_error(meta)
            tensors = to_tensors(meta.json()["inputs"], instances)
            body = {
                "inputs": [
                    {
                        "name": n,
                        "datatype": dt,
                        "shape": list(a.shape),
                        "data": oip.json_data(a),
                    }
                    for n, dt, a in tensors
                ]
            }
            resp = client.post(
                base + "/infer",
                content=orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
                headers={"content-type": "application/json"},
            )
    except httpx.HTTPError as exc:
        raise OipClientError(
            f"cannot reach the gateway at {url}: {exc}. Is `serving up` running?"
        ) from None
    if resp.status_code != 200:
        raise _rest_error(resp)
    answer: dict[str, Any] = resp.json()
    return answer, resp.headers.get("server-timing", "")


# ---- gRPC ------------------------------------------------------------------------------
def _grpc_error(exc: grpc.RpcError, target: str) -> OipClientError:
    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE and "connect" in (exc.details() or "").lower():
        return OipClientError(
            f"cannot reach the gateway's gRPC service at {target}: {exc.details()}. "
            "Is `serving up` running?"
        )
    return OipClientError(f"{code.name}: {exc.details()}")


def predict_grpc(
    target: str, model: str, version: str | None, instances: Any, timeout_s: float = 30.0
) -> tuple[dict[str, Any], str]:
    """(v2 answer as JSON, server-timing) from ModelInfer with raw input contents."""
    from serving.proto import grpc_predict_v2_pb2 as pb
    from serving.proto import grpc_predict_v2_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            meta = stub.ModelMetadata(
                pb.ModelMetadataRequest(name=model, version=version or ""), timeout=timeout_s
            )
            inputs = [
                {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                for t in meta.inputs
            ]
            tensors = to_tensors(inputs, instances)
            request = pb.ModelInferRequest(model_name=model, model_version=version or "")
            for n, dt, a in tensors:
                request.inputs.add(name=n, datatype=dt, shape=a.shape)
                request.raw_input_contents.append(oip.encode_raw(a))
            response, call = stub.ModelInfer.with_call(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            raise _grpc_error(exc, target) from None
    outputs = []
    for i, o in enumerate(response.outputs):
        if i < len(response.raw_output_contents):
            arr = oip.decode_raw(o.name, o.datatype, list(o.shape), response.raw_output_contents[i])
        else:
            field = oip.contents_field(o.name, o.datatype)
            arr = oip.decode_values(o.name, o.datatype, list(o.shape), getattr(o.contents, field))
        data = oip.json_data(arr)
        outputs.append(
            {
                "name": o.name,
                "datatype": o.datatype,
                "shape": list(o.shape),
                "data": data.tolist() if isinstance(data, np.ndarray) else data,
            }
        )
    answer: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
    }
    if response.id:
        answer["id"] = response.id
    if response.parameters:
        answer["parameters"] = {
            k: getattr(p, p.WhichOneof("parameter_choice") or "string_param")
            for k, p in response.parameters.items()
        }
    answer["outputs"] = outputs
    timing = dict(call.trailing_metadata() or ()).get("server-timing", "")
    return answer, str(timing)
