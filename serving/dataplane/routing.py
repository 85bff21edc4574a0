"""Which version answers a request, and what each version takes.

The data plane reads routing through the small `Router` interface: the rollouts'
routing tables (serving.rollouts.tables.TableRouter, kept current from Redis) implement
it, and `StaticRouter` (every model on its configured default) stands in where no
rollout state exists. `Catalog` knows the configured models, their manifests and which
versions are served, and picks the version for one request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Protocol

from serving.errors import ConfigError, NotFound, NotReady
from serving.models.registry import Arrays, Manifest, Registry
from serving.settings import DeploymentFile, ModelConfig

Arm = Literal["stable", "canary", "pinned"]


class Router(Protocol):
    """Routing as the request path reads it: memory only, never a round trip."""

    def route(self, model: str, sticky: str | None) -> tuple[str, Arm]:
        """The version and arm for one request (sticky: the caller's key, if any)."""
        ...

    def stable(self, model: str) -> str: ...

    def sticky_field(self, model: str) -> str | None: ...

    def shadow_for(self, model: str) -> str | None:
        """The shadow version when this request is sampled for a copy, else None."""
        ...

    def routed_versions(self, model: str) -> set[str]: ...

    async def ensure_started(self) -> None: ...


class StaticRouter:
    """Every request on the model's configured default: no canary, no shadow."""

    def __init__(self, defaults: Mapping[str, str]) -> None:
        self._defaults = dict(defaults)

    def route(self, model: str, sticky: str | None) -> tuple[str, Arm]:
        return self._defaults[model], "stable"

    def stable(self, model: str) -> str:
        return self._defaults[model]

    def sticky_field(self, model: str) -> str | None:
        return None

    def shadow_for(self, model: str) -> str | None:
        return None

    def routed_versions(self, model: str) -> set[str]:
        return {self._defaults[model]}

    async def ensure_started(self) -> None:
        return None


# The one label value of every model or version name that is not served here.
OTHER = "_other"


class Catalog:
    """Configured models, their manifests, the versions served, and the route."""

    def __init__(self, dep: DeploymentFile, router: Router) -> None:
        self._dep = dep
        self.router = router
        self._registry = Registry(dep.registry)
        # Configured versions are read at start-up (a bad manifest fails it, naming the
        # file); versions that rollouts bring in are read on first use.
        self.manifests: dict[tuple[str, str], Manifest] = {
            (m, v): self._registry.get(m, v).manifest
            for m, cfg in dep.models.items()
            for v in cfg.versions
        }

    @property
    def models(self) -> list[str]:
        return list(self._dep.models)

    def served_versions(self, model: str) -> list[str]:
        """Versions that take traffic: those the routing table names, plus configured
        non-default versions (reachable when pinned). The configured default counts
        only while the table still routes to it: a promotion retires it."""
        return served_versions(self._dep.models[model], self.router.routed_versions(model))

    def default_version(self, model: str) -> str:
        return self.router.stable(model)

    def manifest(self, model: str, version: str) -> Manifest:
        key = (model, version)
        m = self.manifests.get(key)
        if m is None:
            try:
                m = self.manifests[key] = self._registry.get(model, version).manifest
            except ConfigError as exc:
                raise NotReady(f"{model}/{version}: {exc}") from None
        return m

    def labels(self, model: str, version: str | None) -> tuple[str, str]:
        """Metric labels for a request's names: only configured models and versions
        known here become label values, every other name counts under OTHER, so that
        unauthenticated requests cannot create series (or in-flight entries) at will."""
        if model not in self._dep.models:
            return OTHER, OTHER if version else ""
        if not version:
            return model, ""
        return model, version if (model, version) in self.manifests else OTHER

    def resolve(self, model: str, version: str | None) -> tuple[str, Manifest]:
        """A served version of a configured model (default: the stable one), or 404."""
        if model not in self._dep.models:
            known = ", ".join(sorted(self._dep.models)) or "none"
            raise NotFound(f"model {model!r} not found (served: {known})", field="model")
        v = version or self.default_version(model)
        served = self.served_versions(model)
        if v not in served:
            raise NotFound(
                f"version {v!r} of model {model!r} not found (served: {', '.join(served)})",
                field="version",
            )
        return v, self.manifest(model, v)

    def choose(
        self,
        model: str,
        version: str | None,
        pinned: str | None,
        instances: Any,
        tensors: Arrays | None,
        headers: Mapping[str, str],
    ) -> tuple[str, Arm, Manifest]:
        """The version for this request: the path's version or the pin header win;
        else the routing table, sticky on the table's key when it has one."""
        if version is not None or pinned is not None:
            v, manifest = self.resolve(model, version or pinned)
            return v, "pinned", manifest
        if model not in self._dep.models:
            self.resolve(model, None)  # raises NotFound naming the served models
        key = self.router.sticky_field(model)
        sticky: str | None = None
        if key is not None:
            if key.startswith("header:"):
                sticky = headers.get(key[7:].lower())
            elif tensors is not None and key in tensors and len(tensors[key]):
                first = tensors[key][0]
                sticky = first.decode() if isinstance(first, bytes) else str(first)
            elif isinstance(instances, list) and instances and isinstance(instances[0], dict):
                value = instances[0].get(key)
                sticky = None if value is None else str(value)
        routed, arm = self.router.route(model, sticky)
        v, manifest = self.resolve(model, routed)
        return v, arm, manifest


def served_versions(cfg: ModelConfig, routed: set[str]) -> list[str]:
    """A model's versions that take traffic, given those its routing table names."""
    return sorted(routed | (set(cfg.versions) - {cfg.default}))
