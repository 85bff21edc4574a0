"""The data plane: the request flow every transport calls (`DataPlane.predict`).

Parts, one job each: `routing` (which version: the `Router` interface and the catalog of
models), `decode` (validation against the manifest), `features` (lookup and policy),
`invoke` (calling a version, fused or remote, Ray's errors mapped once), `hooks` (after
an answer: metrics, statistics, records, drift, `shadow`), `admission` (load shedding),
`monitor` (readiness and gauges); `plane` runs them in order.
"""

from serving.dataplane.plane import DataPlane, Prediction, RequestInfo

__all__ = ["DataPlane", "Prediction", "RequestInfo"]
