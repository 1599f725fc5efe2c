"""Services, EndpointSlices and Nodes from a directory of YAML/JSON manifests, for the lab and for users without a
cluster. Multi-document files are fine; the directory is polled and a changed file is re-read.

A broken file or object never deletes what it held before: the last good version of each file, and of each object
in it, stays in effect (and the error is reported) until the file is fixed or the object removed from it.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kpr.k8s.convert import (
    InvalidObject,
    endpoint_slice_from_dict,
    node_from_dict,
    object_kind,
    service_from_dict,
)
from kpr.model.types import EndpointSliceSpec, NodeInfo, ServiceSpec
from kpr.sources.events import Event, Replace, SourceError

SUFFIXES = (".yaml", ".yml", ".json")
ObjectId = tuple[str, str, str]  # (kind, namespace, name)
Parsed = ServiceSpec | EndpointSliceSpec | NodeInfo


@dataclass
class Snapshot:
    services: list[ServiceSpec]
    slices: list[EndpointSliceSpec]
    node: NodeInfo | None
    errors: list[str] = field(default_factory=list)


def _object_id(d: Mapping[str, Any]) -> ObjectId:
    meta = d.get("metadata") or {}
    return (str(d.get("kind", "")), str(meta.get("namespace") or "default"), str(meta.get("name", "")))


def _documents(text: str) -> Iterator[Mapping[str, Any]]:
    for doc in yaml.safe_load_all(text):
        if doc is None:
            continue
        if not isinstance(doc, Mapping):
            raise InvalidObject("a document is not a mapping")
        if doc.get("kind") == "List":
            yield from (item for item in doc.get("items") or [] if isinstance(item, Mapping))
        else:
            yield doc


class ManifestSource:
    def __init__(self, directory: Path, node_name: str) -> None:
        self.directory = directory
        self.node_name = node_name
        self._signatures: dict[Path, tuple[int, int, int]] = {}
        self._objects: dict[Path, dict[ObjectId, Parsed]] = {}  # last good objects per file
        self._errors: dict[Path, list[str]] = {}
        self._polled = False

    def _scan(self) -> dict[Path, tuple[int, int, int]]:
        found = {}
        if not self.directory.is_dir():
            raise FileNotFoundError(f"manifest directory {self.directory} does not exist")
        for root, _dirs, files in os.walk(self.directory):
            for name in files:
                if name.endswith(SUFFIXES) and not name.startswith("."):
                    path = Path(root) / name
                    try:
                        st = path.stat()
                    except FileNotFoundError:
                        continue
                    found[path] = (st.st_mtime_ns, st.st_size, st.st_ino)
        return found

    def poll(self) -> Snapshot | None:
        """A full snapshot when anything changed since the last poll, else None."""
        current = self._scan()
        if current == self._signatures and self._polled:
            return None
        self._polled = True
        for path in set(self._objects) - set(current):
            self._objects.pop(path, None)
            self._errors.pop(path, None)
        signatures = {}
        for path, sig in current.items():
            if self._signatures.get(path) == sig:
                signatures[path] = sig
                continue
            if self._read(path):
                signatures[path] = sig  # a file that did not parse (half written?) is read again next time
        self._signatures = signatures
        return self.snapshot()

    def _read(self, path: Path) -> bool:
        previous = self._objects.get(path, {})
        errors: list[str] = []
        try:
            docs = list(_documents(path.read_text()))
        except (OSError, yaml.YAMLError, InvalidObject) as e:
            self._errors[path] = [f"{path}: cannot read: {e}".replace("\n", " ")]
            return False
        objects: dict[ObjectId, Parsed] = {}
        for doc in docs:
            oid = _object_id(doc)
            try:
                parsed = self._convert(doc)
            except InvalidObject as e:
                errors.append(f"{path}: {e}")
                if oid in previous:
                    objects[oid] = previous[oid]  # keep the last good version in effect
                continue
            if parsed is not None:
                objects[oid] = parsed
        self._objects[path] = objects
        self._errors[path] = errors
        return True  # parsed: invalid objects keep their last good version until the file changes again

    def _convert(self, doc: Mapping[str, Any]) -> Parsed | None:
        kind = object_kind(doc)
        if kind == "Service":
            return service_from_dict(doc)
        if kind == "EndpointSlice":
            return endpoint_slice_from_dict(doc)
        if kind == "Node":
            if (doc.get("metadata") or {}).get("name") != self.node_name:
                return None
            return node_from_dict(doc)
        return None  # other kinds (Deployments, ConfigMaps ...) may share the directory

    def snapshot(self) -> Snapshot:
        services: dict[ObjectId, ServiceSpec] = {}
        slices: dict[ObjectId, EndpointSliceSpec] = {}
        node = None
        for path in sorted(self._objects):
            for oid, obj in self._objects[path].items():
                if isinstance(obj, ServiceSpec):
                    services[oid] = obj
                elif isinstance(obj, EndpointSliceSpec):
                    slices[oid] = obj
                else:
                    node = obj
        errors = [e for path in sorted(self._errors) for e in self._errors[path]]
        return Snapshot(list(services.values()), list(slices.values()), node, errors)


class ManifestPoller:
    """Polls a ManifestSource and turns each changed snapshot into Replace events (the directory is the whole set)."""

    def __init__(
        self, source: ManifestSource, out: queue.Queue[Event], stop: threading.Event, interval: float = 0.2
    ) -> None:
        self.source = source
        self.out = out
        self.stop = stop
        self.interval = interval
        self._reported: set[str] = set()
        self.thread = threading.Thread(target=self._run, name="manifests", daemon=True)

    def start(self) -> None:
        self.poll_once()  # the first snapshot is in the queue before start() returns
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.poll_once()
            except OSError as e:
                self.out.put(SourceError(None, f"{self.source.directory}: {e}", "read_failed"))

    def poll_once(self) -> None:
        snapshot = self.source.poll()
        if snapshot is None:
            return
        for error in snapshot.errors:
            if error not in self._reported:
                self.out.put(SourceError(None, error, "invalid"))
        self._reported = set(snapshot.errors)
        self.out.put(Replace("Service", tuple(snapshot.services)))
        self.out.put(Replace("EndpointSlice", tuple(snapshot.slices)))
        self.out.put(Replace("Node", (snapshot.node,) if snapshot.node else ()))
