"""MLflow as a registry source: a version of an MLflow registered model
(`models:/fraud/3`, `models:/fraud@champion`) materialised into the on-disk registry
(`<root>/<name>/<version>/model.yaml` + artifact). Everything downstream (deploying,
serving, rollouts) reads the on-disk copy and never knows where it came from.

- Resolve: the version (by number or alias) through `mlflow.MlflowClient`, with its
  tags, its registered model's tags and its run's metrics.
- Fetch: `mlflow.artifacts.download_artifacts` into a folder under the registry root.
- Convert: the flavor's artifact, runtime, inputs and outputs
  (serving.models.mlflow_flavors: ONNX and PyTorch as they are, never a pickle;
  scikit-learn via ONNX only when the caller trusts the registry).
- Our manifest keys (batching, resources, warmup, features, drift, description,
  metrics) come from the caller's overrides (the deployment file), then the version's
  `serving.*` tags, then its registered model's, then (metrics) its run's, then the
  manifest's defaults (serving.models.mlflow_meta).
- Check and publish: the staged version is loaded by its runtime and run on a batch
  of zeros, then renamed into place (atomic). Importing the same MLflow version again
  changes nothing (or only the manifest keys, if they changed); another model already
  at that name/version is refused unless `force`.

mlflow is imported inside the functions: the gateway imports without it, and a
`models:/` URI then fails with a ConfigError naming the extra to install. Every
network call has a timeout (MLflow's own defaults retry for minutes; see HTTP_LIMITS).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from serving.errors import ConfigError
from serving.models.mlflow_flavors import check_runs, materialize
from serving.models.mlflow_meta import MANIFEST_KEYS, manifest_keys
from serving.models.registry import _NAME, MANIFEST, Manifest, ModelVersion, load_version
from serving.settings import DeploymentFile, validate_file

PREFIX = "models:/"
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))$")
INCOMING = ".incoming"  # staging folders under the registry root (never read as versions)
# MLflow's HTTP client defaults to 7 retries with exponential backoff and 120 s per
# request: minutes before a down server is reported. These apply unless the
# environment sets MLflow's own variables (a timeout is per connect or read).
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
}
Progress = Callable[[str], None]


class MlflowUnavailable(ConfigError):
    """The tracking server did not answer (down, unreachable, timed out, 5xx)."""


def is_mlflow_uri(value: object) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def parse_uri(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/NAME/VERSION` → (NAME, VERSION, None); `models:/NAME@ALIAS` → (NAME,
    None, ALIAS). Stages (`/Production`, `/latest`) and logged-model ids are refused."""
    m = _URI.match(uri.strip()) if is_mlflow_uri(uri.strip()) else None
    if m is None:
        raise ConfigError(
            f"{uri!r}: not an MLflow model version; write models:/NAME/VERSION (a number) "
            "or models:/NAME@ALIAS"
        )
    name, version, alias = m["name"], m["version"], m["alias"]
    if version is not None and not version.isdigit():
        raise ConfigError(
            f"{uri!r}: {version!r} is not a version number (stages such as Production or "
            "latest are not supported: use models:/NAME@ALIAS)"
        )
    if alias is not None and not re.fullmatch(r"[\w-]+", alias):
        raise ConfigError(f"{uri!r}: an alias has letters, digits, '_' and '-' only")
    return name, version, alias


# ---- MLflow -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Resolved:
    """One MLflow model version, as the registry describes it."""

    uri: str  # as given (a number or an alias)
    name: str
    version: str  # MLflow's version number
    run_id: str | None
    artifact: str  # where MLflow keeps the model (the version's `source`)
    version_tags: dict[str, str]
    model_tags: dict[str, str]
    run_metrics: dict[str, float]
    tracking_uri: str
    registry_uri: str


def _mlflow() -> Any:
    try:
        import mlflow
    except ImportError:
        raise ConfigError(
            "an MLflow model URI (models:/...) needs MLflow, which is not installed: "
            "pip install 'serving[mlflow]'"
        ) from None
    for k, v in HTTP_LIMITS.items():
        os.environ.setdefault(k, v)
    return mlflow


@contextlib.contextmanager
def _answers(uri: str, tracking: str) -> Iterator[None]:
    """MLflow's failures as ours: no answer is MlflowUnavailable, an answer (not found,
    a bad request) a ConfigError, both naming the URI and the server."""
    from mlflow.exceptions import MlflowException, RestException

    no_answer = (MlflowException, importlib.import_module("requests").RequestException)
    try:
        yield
    except RestException as exc:
        what = "not found" if exc.error_code == "RESOURCE_DOES_NOT_EXIST" else "refused"
        raise ConfigError(f"{uri}: {what} by MLflow at {tracking}: {exc.message}") from None
    except no_answer as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MlflowUnavailable(
            f"{uri}: MLflow at {tracking} did not answer ({first[:300]}); is the tracking "
            "server up, and SERVING_MLFLOW_TRACKING_URI (or MLFLOW_TRACKING_URI) right?"
        ) from None


def resolve(uri: str, tracking_uri: str | None = None) -> Resolved:
    """The model version a URI names now (an alias may move later)."""
    name, number, alias = parse_uri(uri)
    mlflow = _mlflow()
    env = mlflow.environment_variables  # MLflow's own settings: MLFLOW_TRACKING_URI, ...
    tracking = tracking_uri or env.MLFLOW_TRACKING_URI.get()
    if not tracking:
        raise ConfigError(
            f"{uri}: no MLflow tracking server named: set SERVING_MLFLOW_TRACKING_URI (or "
            "MLFLOW_TRACKING_URI), or pass --tracking-uri"
        )
    registry = env.MLFLOW_REGISTRY_URI.get() or tracking
    client = mlflow.MlflowClient(tracking_uri=tracking, registry_uri=registry)
    with _answers(uri, tracking):
        mv = (
            client.get_model_version_by_alias(name, alias)
            if alias is not None
            else client.get_model_version(name, number)
        )
        model_tags = dict(client.get_registered_model(name).tags or {})
    if mv.status not in (None, "READY"):  # e.g. PENDING_REGISTRATION, FAILED_REGISTRATION
        raise ConfigError(f"{uri}: MLflow {name} version {mv.version} is {mv.status}, not READY")
    metrics: dict[str, float] = {}
    if mv.run_id:
        # Metrics are a nicety: a run deleted or kept elsewhere costs nothing else.
        with contextlib.suppress(ConfigError), _answers(uri, tracking):
            metrics = dict(client.get_run(mv.run_id).data.metrics)
    return Resolved(
        uri=uri,
        name=name,
        version=str(mv.version),
        run_id=mv.run_id or None,
        artifact=str(mv.source),
        version_tags=dict(mv.tags or {}),
        model_tags=model_tags,
        run_metrics=metrics,
        tracking_uri=tracking,
        registry_uri=registry,
    )


# ---- import -------------------------------------------------------------------------------
def _training(ref: Resolved, flavor: str, notes: Mapping[str, str]) -> dict[str, str]:
    """The manifest's record of where the version came from (also its identity)."""
    out = {
        "source": ref.uri,
        "mlflow_model": ref.name,
        "mlflow_version": ref.version,
        "mlflow_artifact": ref.artifact,
        "flavor": flavor,
        **notes,
    }
    if ref.run_id:
        out["mlflow_run_id"] = ref.run_id
    return out


def _same_source(manifest: Manifest, ref: Resolved) -> bool:
    t = manifest.training
    return (t.get("mlflow_model"), str(t.get("mlflow_version")), t.get("mlflow_artifact")) == (
        ref.name,
        ref.version,
        ref.artifact,
    )


def _with_keys(base: dict[str, Any], keys: Mapping[str, Any], label: Path) -> Manifest:
    data = {k: v for k, v in base.items() if k not in MANIFEST_KEYS}
    manifest: Manifest = validate_file(label, Manifest, {**data, **keys})
    return manifest


def _write_manifest(folder: Path, manifest: Manifest) -> None:
    """Replace the manifest atomically (a reader sees the old one or the new one)."""
    tmp = folder / f".{MANIFEST}.{uuid.uuid4().hex[:8]}"
    data = manifest.model_dump(mode="json", exclude_none=True)
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, folder / MANIFEST)


def _existing(folder: Path) -> ModelVersion | None:
    try:
        return load_version(folder) if folder.is_dir() else None
    except ConfigError:
        return None  # something else, unreadable: never the same source


def import_version(
    uri: str,
    registry_root: Path,
    name: str | None = None,
    version: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
    *,
    allow_pickle: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> ModelVersion:
    """Materialise the MLflow model version `uri` names as `<registry_root>/<name>/
    <version>` (default: the MLflow model's name and `m<version number>`); see the
    module. Raises ConfigError (MlflowUnavailable when the server did not answer)."""
    say = progress or (lambda _msg: None)
    say(f"resolving {uri} ...")
    ref = resolve(uri, tracking_uri)
    name, version = name or ref.name, version or f"m{ref.version}"
    if not _NAME.match(name) or not _NAME.match(version):
        raise ConfigError(f"{name}/{version}: use letters, digits, '.', '_' or '-' (at most 63)")
    where = f"{uri} (MLflow {ref.name} version {ref.version})"
    keys = manifest_keys(overrides, ref.version_tags, ref.model_tags, ref.run_metrics, where)
    target = registry_root / name / version
    label = Path(f"{uri} as {name}/{version}")
    existing = _existing(target)
    if existing is not None and _same_source(existing.manifest, ref) and not force:
        data = existing.manifest.model_dump(mode="json")
        manifest = _with_keys(data, keys, label)
        if manifest == existing.manifest:
            say(f"{name}/{version} already holds {where}: nothing to do")
            return existing
        _write_manifest(target, manifest)
        say(f"{name}/{version} already holds {where}: manifest keys updated")
        return load_version(target)
    if target.exists() and not force:
        t = existing.manifest.training if existing else {}
        held = (
            f"{t['source']} (MLflow {t.get('mlflow_model')} version {t.get('mlflow_version')})"
            if "source" in t
            else "another model"
        )
        raise ConfigError(
            f"{target} already holds {held}, not {where}: a version name stands for one "
            "model (an alias that moved needs a new one), or replace it with --force"
        )
    staging = registry_root / INCOMING / uuid.uuid4().hex
    try:
        return _import(ref, staging, target, keys, label, where, allow_pickle, say)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(OSError):
            (registry_root / INCOMING).rmdir()  # only when no other import is under way


def _import(
    ref: Resolved,
    staging: Path,
    target: Path,
    keys: Mapping[str, Any],
    label: Path,
    where: str,
    allow_pickle: bool,
    say: Progress,
) -> ModelVersion:
    # Staged as <root>/.incoming/<id>/<name>/<version>: load_version's name check holds,
    # and the registry's */*/model.yaml never sees it.
    folder = staging / target.parent.name / target.name
    folder.mkdir(parents=True)
    say(f"downloading {ref.name} version {ref.version} from {ref.tracking_uri} ...")
    mlflow = _mlflow()
    with _answers(ref.uri, ref.tracking_uri):
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{PREFIX}{ref.name}/{ref.version}",
            dst_path=str(staging / "download"),
            tracking_uri=ref.tracking_uri,
            registry_uri=ref.registry_uri,
        )
    made = materialize(Path(local), folder, allow_pickle=allow_pickle, where=where)
    say(f"flavor {made.flavor}: runtime {made.runtime}, artifact {made.artifact}")
    data = {
        "name": target.parent.name,
        "version": target.name,
        "runtime": made.runtime,
        "artifact": made.artifact,
        "inputs": [s.model_dump() for s in made.inputs],
        "outputs": [s.model_dump() for s in made.outputs],
        "training": _training(ref, made.flavor, made.notes),
    }
    _write_manifest(folder, _with_keys(data, keys, label))
    mv = load_version(folder)
    say(f"checking {target.parent.name}/{target.name} with its runtime ...")
    check_runs(mv, where)
    target.parent.mkdir(parents=True, exist_ok=True)
    replaced = staging / "replaced"
    if target.exists():  # --force: the old version goes aside, then the new one in
        os.rename(target, replaced)
    try:
        os.rename(folder, target)
    except OSError:
        if replaced.exists() and not target.exists():
            os.rename(replaced, target)  # put back what --force was to replace
        # Another import got there first: fine if it brought the same version.
        other = _existing(target)
        if other is not None and _same_source(other.manifest, ref):
            return other
        raise ConfigError(f"{target}: appeared while importing {where}; not replaced") from None
    say(f"imported {where} as {target.parent.name}/{target.name}")
    return load_version(target)


# ---- callers: `serving up` and the rollout control plane ------------------------------------
def import_sources(
    dep: DeploymentFile, tracking_uri: str | None, progress: Progress | None = None
) -> None:
    """Import every version of the deployment file that names a `source` (before the
    Serve config is built: it reads their manifests). MLflow is untouched without one."""
    say = progress or (lambda _msg: None)
    for model, mcfg in dep.models.items():
        for version, vcfg in mcfg.versions.items():
            if vcfg.source is None:
                if vcfg.manifest or vcfg.allow_pickle:
                    raise ConfigError(
                        f"models.{model}.versions.{version}: manifest and allow_pickle "
                        "apply to an imported `source` only"
                    )
                continue
            say(f"importing {vcfg.source} as {model}/{version} ...")
            try:
                import_version(
                    vcfg.source,
                    dep.registry,
                    model,
                    version,
                    vcfg.manifest,
                    tracking_uri,
                    allow_pickle=vcfg.allow_pickle,
                    progress=lambda msg: say(f"  {msg}"),
                )
            except MlflowUnavailable as exc:
                # A restart during an MLflow outage serves what was imported before.
                held = _existing(dep.registry / model / version)
                if held is None or held.manifest.training.get("source") != vcfg.source:
                    raise
                say(f"  warning: {exc}; serving {model}/{version} as imported before")


def rollout_body(
    body: Mapping[str, Any], key: str, registry_root: Path, model: str, tracking_uri: str | None
) -> dict[str, Any]:
    """A rollout command whose `key` (`to`, or a shadow's `version`) is an MLflow URI:
    the version it names is imported as `<model>/m<number>` unless already there, and
    the command names that version instead, keeping the URI as `source` (which the
    controller records in the decision). `allow_pickle` in the body allows a
    scikit-learn model (see mlflow_flavors)."""
    uri = str(body[key])
    mv = import_version(
        uri,
        registry_root,
        model,
        None,
        None,
        tracking_uri,
        allow_pickle=bool(body.get("allow_pickle")),
    )
    out = {k: v for k, v in body.items() if k != "allow_pickle"}
    out.update({key: mv.manifest.version, "source": uri})
    return out
