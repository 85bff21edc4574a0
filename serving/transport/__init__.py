"""Transports: thin adapters that parse a request, call the data plane, encode the answer.

`context` is what every transport shares (request context, ids, deadlines, Server-Timing),
`errors` maps the one error hierarchy to HTTP and gRPC, `http` holds what the REST
transports share; `rest_v1`, `rest_v2`, `rest_admin` and `grpc` are the transports;
`http_app` composes the REST ones into one ASGI app, which `direct_http` serves.
"""
