"""A KubeRay RayService for the gateway: the portable Serve config (serving.deploy) as
its `serveConfigV2`, and a Ray cluster to run it on.

The cluster: a head that runs no replicas (`num-cpus: 0`: Ray's control processes and
the Serve controller only); a CPU worker group of one pod per ingress replica, each
offering one unit of the custom resource INGRESS_RESOURCE that an ingress replica
asks for (so every pod of the group is a front door, with `/readyz` and `/healthz`
probes), which also hosts CPU model replicas; and a GPU worker group (`nvidia.com/gpu`
limits, the GPU image), autoscaled, for versions that ask for `num_gpus`. What differs
per environment reaches the pods as environment: the Redis URL from a Secret, the
admin token as a file mounted from the same Secret (SERVING_ADMIN_TOKEN_FILE), never
from the config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import yaml

from serving.settings import DeploymentFile, Settings

RAY_VERSION = "2.60.0"
TOKEN_DIR = "/var/run/secrets/serving"
REGISTRY_DIR = "/app/models"  # where the images keep the demo registry
INGRESS_RESOURCE = "serving-ingress"


@dataclass(frozen=True)
class ClusterSpec:
    """What `serving config render --format rayservice` lets a user choose."""

    name: str = "serving-gateway"
    image: str = "serving-gateway:latest"
    gpu_image: str = "serving-gateway:latest-gpu"
    secret: str = "serving-gateway"  # keys: redis-url, admin-token
    gpu_workers: int = 1


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2) as literal blocks: readable, diffable."""


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    return dumper.represent_scalar(
        "tag:yaml.org,2002:str", data, style="|" if "\n" in data else None
    )


_Dumper.add_representer(str, _str)


def dump(doc: dict[str, Any]) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False)


def needs_gpu(dep: DeploymentFile) -> bool:
    return any(
        (v.resources.num_gpus or 0) > 0 for m in dep.models.values() for v in m.versions.values()
    )


def for_cluster(dep: DeploymentFile) -> DeploymentFile:
    """The deployment with each ingress replica asking for one ingress unit."""
    ingress = dep.ingress.model_copy(update={"custom_resources": {INGRESS_RESOURCE: 1.0}})
    return dep.model_copy(update={"ingress": ingress})


def rayservice(
    serve_config: dict[str, Any], dep: DeploymentFile, settings: Settings, spec: ClusterSpec
) -> dict[str, Any]:
    """The whole RayService object (apiVersion ray.io/v1); `serve_config` is the
    portable config of `for_cluster(dep)`."""
    http, grpc, metrics = settings.http_port, settings.grpc_port, settings.metrics_port
    document = {
        # Ray's own proxy (not the front door when http_mode is direct) on every node.
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": settings.proxy_port()},
        **serve_config,
    }
    ingress = dep.ingress
    cpu_workers = max(ingress.num_replicas, 1)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": spec.name, "labels": {"app.kubernetes.io/name": spec.name}},
        "spec": {
            "serveConfigV2": yaml.safe_dump(document, sort_keys=False),
            "deploymentUnhealthySecondThreshold": 300,
            "serviceUnhealthySecondThreshold": 900,
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                "headGroupSpec": {
                    "rayStartParams": {
                        "num-cpus": "0",
                        "dashboard-host": "0.0.0.0",
                        "metrics-export-port": str(metrics),
                    },
                    "template": _pod(
                        spec, spec.image, "ray-head", _head_ports(metrics), "2", "8Gi", None
                    ),
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "cpu",
                        "replicas": cpu_workers,
                        "minReplicas": cpu_workers,
                        "maxReplicas": cpu_workers,
                        "rayStartParams": {
                            "metrics-export-port": str(metrics),
                            # KubeRay passes it to `ray start --resources` as JSON.
                            "resources": json.dumps(json.dumps({INGRESS_RESOURCE: 1})),
                        },
                        "template": _pod(
                            spec,
                            spec.image,
                            "ray-worker",
                            _gateway_ports(http, grpc, metrics),
                            "2",
                            "8Gi",
                            http,
                        ),
                    },
                    {
                        "groupName": "gpu",
                        "replicas": spec.gpu_workers if needs_gpu(dep) else 0,
                        "minReplicas": 0,
                        "maxReplicas": max(spec.gpu_workers, 1) * 4,
                        "rayStartParams": {
                            "num-gpus": "1",
                            "metrics-export-port": str(metrics),
                        },
                        "template": _pod(
                            spec,
                            spec.gpu_image,
                            "ray-worker",
                            [{"name": "metrics", "containerPort": metrics}],
                            "4",
                            "16Gi",
                            None,
                            gpus=1,
                        ),
                    },
                ],
            },
        },
    }


def _head_ports(metrics: int) -> list[dict[str, Any]]:
    return [
        {"name": "gcs", "containerPort": 6379},
        {"name": "dashboard", "containerPort": 8265},
        {"name": "client", "containerPort": 10001},
        {"name": "metrics", "containerPort": metrics},
    ]


def _gateway_ports(http: int, grpc: int, metrics: int) -> list[dict[str, Any]]:
    return [
        {"name": "serve", "containerPort": http},
        {"name": "grpc", "containerPort": grpc},
        {"name": "metrics", "containerPort": metrics},
    ]


def _pod(
    spec: ClusterSpec,
    image: str,
    container: str,
    ports: list[dict[str, Any]],
    cpu: str,
    memory: str,
    probe_port: int | None,
    gpus: int = 0,
) -> dict[str, Any]:
    """A Ray node's pod template: the gateway's environment, the token Secret mounted,
    and (on the pods that host an ingress replica) probes on its health routes."""
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    c: dict[str, Any] = {
        "name": container,
        "image": image,
        "ports": ports,
        "env": [
            {
                "name": "SERVING_REDIS_URL",
                "valueFrom": {"secretKeyRef": {"name": spec.secret, "key": "redis-url"}},
            },
            {"name": "SERVING_ADMIN_TOKEN_FILE", "value": f"{TOKEN_DIR}/admin-token"},
            {"name": "SERVING_REGISTRY_DIR", "value": REGISTRY_DIR},
            # A pod is its own host: the front door listens on the pod's address.
            {"name": "SERVING_HTTP_HOST", "value": "0.0.0.0"},
        ],
        "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": limits},
        "volumeMounts": [{"name": "serving-secret", "mountPath": TOKEN_DIR, "readOnly": True}],
        # Serve drains an ingress replica (answers what it has read) before the pod goes.
        "lifecycle": {"preStop": {"exec": {"command": ["ray", "stop"]}}},
    }
    if probe_port is not None:
        c["readinessProbe"] = {
            "httpGet": {"path": "/readyz", "port": probe_port},
            "periodSeconds": 5,
            "failureThreshold": 2,
        }
        c["livenessProbe"] = {
            "httpGet": {"path": "/healthz", "port": probe_port},
            # Start-up (Ray, then deploying and warming the models) takes minutes.
            "initialDelaySeconds": 300,
            "periodSeconds": 10,
            "failureThreshold": 6,
        }
    pod: dict[str, Any] = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000},
        "containers": [c],
        "volumes": [
            {
                "name": "serving-secret",
                "secret": {
                    "secretName": spec.secret,
                    "items": [{"key": "admin-token", "path": "admin-token"}],
                    "defaultMode": 0o400,
                },
            }
        ],
    }
    if gpus:
        pod["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    # The front-door Service and the PodMonitor (deployments/kuberay) select by these.
    return {"metadata": {"labels": {"app.kubernetes.io/part-of": spec.name}}, "spec": pod}
