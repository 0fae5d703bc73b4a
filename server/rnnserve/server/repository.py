"""The model repository: ``<models>/<name>/<version>/`` folders, loaded and hot-reloaded.

A scan loads every version folder not loaded yet (in a worker thread, so serving goes on). A
folder that fails (bad manifest, graph that does not match it, failed self-check) is logged
once and skipped until its manifest or model file changes; it never takes the server down.
A version whose folder disappears stops being offered to new sessions; open sessions keep the
version they started on. Folders whose name starts with a dot are ignored (half-written ones).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from rnnserve.manifest import MANIFEST_FILE, MODEL_FILE, ManifestError, load_manifest
from rnnserve.server import golden
from rnnserve.server.engine import Engine, ModelLoadError, choose_providers
from rnnserve.server.errors import not_found, quoted
from rnnserve.server.metrics import Metrics
from rnnserve.server.model import ServedModel
from rnnserve.server.settings import Settings
from rnnserve.v1 import rnnserve_pb2 as pb

log = logging.getLogger("rnnserve.server.repository")


def version_key(version: str) -> tuple[int, int, str]:
    """Order versions numerically where they are numbers ("2" < "10"), by text otherwise."""
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


def _stamp(folder: Path) -> tuple[float, ...]:
    stamps = []
    for name in (MANIFEST_FILE, MODEL_FILE):
        try:
            stamps.append((folder / name).stat().st_mtime)
        except OSError:
            stamps.append(-1.0)
    return tuple(stamps)


class Repository:
    """The model versions a server serves, by name and version."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.root = settings.models
        self._models: dict[str, dict[str, ServedModel]] = {}
        self._failed: dict[Path, tuple[float, ...]] = {}
        self._lock = asyncio.Lock()
        self._warned_missing = False

    def load_version(self, folder: Path) -> ServedModel:
        """Load and check one version folder (blocking); ModelLoadError/ManifestError say why."""
        manifest = load_manifest(folder)
        if (manifest.name, manifest.version) != (folder.parent.name, folder.name):
            raise ManifestError(
                f"{folder}: manifest names {manifest.name}/{manifest.version}, "
                f"but the folder is {folder.parent.name}/{folder.name}"
            )
        providers = choose_providers(self.settings.provider_list())
        engine = Engine(folder, manifest, providers, self.settings.intra_op_threads)
        diff = (
            golden.self_check(engine, self.settings.self_check_tolerance)
            if self.settings.self_check
            else None
        )
        label = f"{manifest.name}/{manifest.version}"
        model = ServedModel(folder, manifest, engine, self.settings, self.metrics.for_model(label))
        self.metrics.model_info.labels(
            label, manifest.name, manifest.version, manifest.cell, engine.provider
        ).set(1)
        check = (
            "off"
            if not self.settings.self_check
            else ("no golden file" if diff is None else f"max abs diff {diff:.2g}")
        )
        log.info(
            "serving %s (%s, %s) on %s; recurrent nodes: %s; self-check: %s",
            label, manifest.cell, manifest.input_kind, engine.provider,
            ", ".join(f"{k} on {v}" for k, v in engine.node_providers.items()) or "none found",
            check,
        )  # fmt: skip
        return model

    def _candidates(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = []
        for name_dir in sorted(self.root.iterdir()):
            if name_dir.name.startswith(".") or not name_dir.is_dir():
                continue
            for version_dir in sorted(name_dir.iterdir()):
                if not version_dir.name.startswith(".") and version_dir.is_dir():
                    found.append(version_dir)
        return found

    def why_no_models(self, scanned: bool = False) -> str | None:
        """Why this repository serves nothing (None when it may serve something): the folder
        is missing, or holds no ``<name>/<version>/`` folder, or (``scanned``) none of those
        loaded. Says the absolute path: a relative one depends on where the server started."""
        where = self.root.resolve()
        if not self.root.is_dir():
            what = "is not a folder" if self.root.exists() else "does not exist"
            return f"model repository {where} {what}"
        found = self._candidates()
        if not found:
            return (
                f"model repository {where} holds no model "
                f"(expected {where}/<name>/<version>/{MODEL_FILE} and {MANIFEST_FILE})"
            )
        if scanned and not self._models:
            return (
                f"none of the {len(found)} model versions in {where} loaded "
                "(the errors logged above say why)"
            )
        return None

    async def scan(self) -> list[ServedModel]:
        """Load the version folders that are new (or changed since they failed); forget the
        ones that disappeared. Returns the versions added."""
        async with self._lock:
            missing = not self.root.is_dir()
            if missing and not self._warned_missing:
                log.warning("model repository %s does not exist (yet)", self.root)
            self._warned_missing = missing
            present = self._candidates()
            added = []
            for folder in present:
                name, version = folder.parent.name, folder.name
                if version in self._models.get(name, {}):
                    continue
                stamp = _stamp(folder)
                if self._failed.get(folder) == stamp:
                    continue
                try:
                    model = await asyncio.to_thread(self.load_version, folder)
                except (ManifestError, ModelLoadError, OSError) as exc:
                    self._failed[folder] = stamp
                    log.error("skipping %s/%s: %s", name, version, exc)
                    continue
                except Exception:
                    self._failed[folder] = stamp
                    log.exception("skipping %s/%s: unexpected error while loading", name, version)
                    continue
                self._failed.pop(folder, None)
                self._models.setdefault(name, {})[version] = model
                added.append(model)
            keep = {(f.parent.name, f.name) for f in present}
            for name, versions in list(self._models.items()):
                for version in list(versions):
                    if (name, version) not in keep:
                        log.info("%s/%s left the repository; open sessions keep it", name, version)
                        self.metrics.model_info.remove(
                            f"{name}/{version}", name, version, versions[version].manifest.cell,
                            versions[version].engine.provider,
                        )  # fmt: skip
                        del versions[version]
                if not versions:
                    del self._models[name]
            return added

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[str]:
        return sorted(self._models.get(name, {}), key=version_key)

    def resolve(self, name: str, version: str = "") -> ServedModel:
        """The model version to use (the latest when ``version`` is empty); NOT_FOUND naming
        what exists."""
        versions = self._models.get(name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise not_found(f"model {quoted(name)!r} is not served here; served models: {known}")
        if not version:
            return versions[self.versions(name)[-1]]
        model = versions.get(version)
        if model is None:
            raise not_found(
                f"model {quoted(name)!r} has no version {quoted(version)!r}; versions: "
                + ", ".join(self.versions(name))
            )
        return model

    def info(self, model: ServedModel) -> pb.ModelInfo:
        info = pb.ModelInfo()
        info.CopyFrom(model.base_info)
        info.versions[:] = self.versions(model.manifest.name) or [model.manifest.version]
        return info

    def all(self) -> list[ServedModel]:
        return [self._models[n][v] for n in self.names() for v in self.versions(n)]
