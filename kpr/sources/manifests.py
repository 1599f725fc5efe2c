"""Services, EndpointSlices and Nodes from a directory of YAML/JSON manifests, for the lab and for users without a
cluster. Multi-document files and `kind: List` are fine; the directory is polled and a changed file is re-read.

A broken file or object never deletes what it held before: the last good version of each file, and of each object
in it, stays in effect (and the problem is reported, once) until the file is fixed or removed. Nothing one file
holds can stop the others from being read.

**What is read.** Files named `*.yaml`, `*.yml` or `*.json` in the directory and its subdirectories, except names
starting with "." (editors' and atomic writers' temporary files, and hidden directories such as a ConfigMap
volume's `..data`). Only regular files and symlinks to regular files are opened: a FIFO, socket or device, a symlink
loop and a dangling symlink are reported and left alone, and a symlink to a directory is reported and not followed
(`os.walk(followlinks=False)`), so no loop can be walked.

**Only complete input.** A file is read only once it is complete, never half written:
- at the first poll after inotify saw it closed after writing (IN_CLOSE_WRITE) or renamed into place (IN_MOVED_TO),
  with no write since; the inotify events and the file's size, mtime, ctime and inode are checked again after
  reading, so a write racing the read is noticed. This covers every atomic writer (write a temporary file, then
  rename it: `kpr.lab.cluster.write_manifest`, `sed -i`, most editors) at no added delay, and in-place writers
  once they close the file;
- a file written in place and not closed yet (`kubectl get ... -o yaml > file` while kubectl still waits for the
  API server) is not read: its last good version stays in effect until the writer closes it. After
  UNSETTLED_SECONDS it is reported, and then used once it is unchanged across two polls (a writer may hold a file
  open for good);
- where inotify has nothing to say (files there before the agent started, symlinked or hard-linked files, whose
  writes may come through another directory, filesystems without inotify such as NFS, an overflowed event queue),
  a changed file is used once two consecutive polls find the same size, mtime, ctime, inode and content hash: the
  writer has been quiet for a whole poll interval.
Timestamps alone cannot tell a file renamed into place from one being written: the writes and the rename usually
fall in the same clock tick, so ctime equals mtime. The limit of every rule: a writer that closes the file between
chunks, or pauses longer than a poll interval without inotify, looks finished.
The first snapshot waits until every file is complete (up to UNSETTLED_SECONDS), so a restarting agent never
programs, or prunes, from a file it caught half written.

**Bounds.** A file over MAX_FILE_BYTES is refused unread; one that is not UTF-8, does not parse, or nests deeper
than MAX_DEPTH collections is refused with what is wrong and where. YAML goes through libyaml (yaml.CSafeLoader,
about 4x faster than the pure-Python loader on a big EndpointSlice), which itself refuses nesting past 1000 levels;
a loader without that limit gets its parse events walked for depth first. Content that looks like JSON is parsed
with orjson (another 100x), falling back to YAML. Each document's depth is then measured without recursion, aliases
and self-references included, before anything else touches it.

**Duplicates.** An object (kind, namespace, name) defined by more than one file, or twice in one file, is reported
naming both places. The file that already provided it keeps providing it, so adding a clumsy copy never changes
what is programmed; when none did (both appeared in the same poll, or at start) the first file in path order wins;
within one file, the first document.
"""

from __future__ import annotations

import codecs
import ctypes
import errno
import functools
import hashlib
import os
import queue
import re
import stat
import struct
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import yaml

from kpr import log
from kpr.model.types import EndpointSliceSpec, NodeInfo, ServiceSpec
from kpr.objects.convert import (
    InvalidObject,
    endpoint_slice_from_dict,
    node_from_dict,
    object_kind,
    service_from_dict,
)
from kpr.objects.events import Event, Kind, Replace, SourceError

SUFFIXES = (".yaml", ".yml", ".json")
MAX_FILE_BYTES = 32 * 1024 * 1024  # a bigger file is refused unread (libyaml takes ~0.6 s per MiB of YAML)
MAX_DEPTH = 100  # collections nested deeper than this are refused (Kubernetes objects stay well under 30)
UNSETTLED_SECONDS = 10.0  # a file still being written after this long is reported, and the first snapshot is sent
MAX_MESSAGE = 400  # characters of one problem's message (parsers quote lines, converters quote values)
KINDS_READ = ("Service", "EndpointSlice", "Node")  # other kinds (Deployments, ConfigMaps ...) may share the directory

ObjectId = tuple[str, str, str]  # (kind, namespace, name)
Parsed = ServiceSpec | EndpointSliceSpec | NodeInfo

_LOADER: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_FIRST_CHAR = re.compile(r"\S")


@dataclass(frozen=True, slots=True)
class Problem:
    """Something in the directory kpr does not use, as it is reported (a SourceError's message and reason)."""

    message: str
    # invalid: the content (the agent logs and counts these); unreadable: not a file kpr can read;
    # incomplete: still being written; read_failed: an unexpected error
    reason: str = "invalid"


@dataclass
class Snapshot:
    services: list[ServiceSpec]
    slices: list[EndpointSliceSpec]
    node: NodeInfo | None
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[str]:
        return [p.message for p in self.problems]


class _Refused(Exception):
    """A file kpr will not use as it is; the message says what is wrong, without the path."""


class _Stat(NamedTuple):
    """What tells one version of a file from another (of the symlink's target for a symlink)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    nlink: int
    link: bool  # reached through a symlink

    @classmethod
    def of(cls, st: os.stat_result, link: bool) -> _Stat:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink, link)


@dataclass(slots=True)
class _File:
    objects: dict[ObjectId, Parsed] = field(default_factory=dict)  # the last good objects
    problems: list[Problem] = field(default_factory=list)  # of the version in `used` (or why the path is unusable)
    used: _Stat | None = None  # the version last read (used or refused); None: read it when complete
    pending: tuple[_Stat, bytes] | None = None  # version and content hash seen at the last poll (two-poll rule)
    changing_since: float | None = None  # monotonic time a newer version was first seen, while not complete
    note: Problem | None = None  # "still being written"


@dataclass(slots=True)
class _Scan:
    entries: dict[Path, _Stat | Problem]  # the files (and unusable paths) found
    unlisted: list[Path]  # subdirectories that could not be listed: what they held stays as it was
    dir_keys: dict[Path, tuple[int, int]]  # (st_dev, st_ino) of every directory walked, for inotify


# --- inotify ---------------------------------------------------------------------------------------------------------

_IN_MODIFY = 0x2
_IN_CLOSE_WRITE = 0x8
_IN_MOVED_FROM = 0x40
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_Q_OVERFLOW = 0x4000
_IN_IGNORED = 0x8000
_IN_ONLYDIR = 0x01000000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_WATCH_MASK = _IN_MODIFY | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE | _IN_ONLYDIR
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then len bytes of name


class _CloseWatch:
    """inotify on every directory walked: whether each file was last closed after writing or renamed into place
    (True), written and not closed since (False), or neither was seen (None). Without inotify, always None."""

    def __init__(self) -> None:
        self.fd = -1
        self._dirs: dict[int, tuple[int, int]] = {}  # watch descriptor → (st_dev, st_ino) of the directory
        self._watched: set[tuple[int, int]] = set()
        self._state: dict[tuple[int, int, str], bool] = {}
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            self._add_watch = libc.inotify_add_watch
            self._add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
            fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        except (OSError, AttributeError):
            return
        if fd >= 0:
            self.fd = fd
            self._finalizer = weakref.finalize(self, os.close, fd)

    def close(self) -> None:
        if self.fd >= 0:
            self.fd = -1
            self._finalizer()

    def watch(self, directory: Path) -> tuple[int, int] | None:
        """Watch a directory (once per inode: a renamed directory keeps its watch); its (st_dev, st_ino)."""
        try:
            st = os.stat(directory)
        except OSError:
            return None
        key = (st.st_dev, st.st_ino)
        if self.fd >= 0 and key not in self._watched:
            wd = self._add_watch(self.fd, os.fsencode(directory), _WATCH_MASK)
            if wd >= 0:  # else (say the max_user_watches limit): no events, the two-poll rule applies
                self._dirs[wd] = key
                self._watched.add(key)
        return key

    def drain(self) -> None:
        while self.fd >= 0:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                self.close()
                self._state.clear()
                return
            offset = 0
            while offset + _EVENT.size <= len(buf):
                wd, mask, _cookie, length = _EVENT.unpack_from(buf, offset)
                name = os.fsdecode(buf[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0"))
                offset += _EVENT.size + length
                self._event(wd, mask, name)

    def _event(self, wd: int, mask: int, name: str) -> None:
        if mask & _IN_Q_OVERFLOW:  # events were lost: nothing is known any more
            self._state.clear()
            return
        directory = self._dirs.get(wd)
        if directory is None:
            return
        if mask & _IN_IGNORED:  # the directory is gone
            del self._dirs[wd]
            self._watched.discard(directory)
            for key in [k for k in self._state if k[:2] == directory]:
                del self._state[key]
            return
        if not name.endswith(SUFFIXES) or name.startswith("."):
            return
        key = (*directory, name)
        if mask & (_IN_CLOSE_WRITE | _IN_MOVED_TO):
            self._state[key] = True
        elif mask & (_IN_MODIFY | _IN_CREATE):
            self._state[key] = False
        elif mask & (_IN_DELETE | _IN_MOVED_FROM):
            self._state.pop(key, None)

    def closed(self, directory: tuple[int, int], name: str) -> bool | None:
        return self._state.get((*directory, name))


# --- reading and parsing ---------------------------------------------------------------------------------------------


def _short(message: str) -> str:
    message = " ".join(message.split())
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 3] + "..."


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def _a(value: Any) -> str:
    """What a value is, in words: 'a list', 'a string', 'null'."""
    if value is None:
        return "null"
    for types, words in (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a number"),
        (str, "a string"),
        (bytes, "binary data"),
        (list, "a list"),
        (Mapping, "a mapping"),
    ):
        if isinstance(value, types):
            return words
    return f"a {type(value).__name__}"


def _file_type(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


def _stat(path: Path) -> _Stat | Problem | None:
    """The file's version, why it cannot be read, or None when it has just been removed. Never opens it."""
    link = False
    try:
        st = os.lstat(path)
        link = stat.S_ISLNK(st.st_mode)
        if link:
            st = os.stat(path)
    except FileNotFoundError:
        if not link:
            return None
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return Problem(f"{path}: a dangling symbolic link (to {target}); not read", "unreadable")
    except OSError as e:
        if e.errno == errno.ELOOP:
            return Problem(f"{path}: a symbolic link loop; not read", "unreadable")
        return Problem(_short(f"{path}: cannot stat: {e.strerror or e}"), "unreadable")
    if not stat.S_ISREG(st.st_mode):
        what = _file_type(st.st_mode) + (" (through a symbolic link)" if link else "")
        return Problem(f"{path}: {what}, not a regular file; not read", "unreadable")
    return _Stat.of(st, link)


def _read_file(path: Path, link: bool) -> tuple[bytes, _Stat]:
    """The file's bytes and its version once read. O_NONBLOCK: a file swapped for a FIFO since the scan cannot block."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Refused(f"{_file_type(st.st_mode)}, not a regular file; not read")
        chunks = []
        total = 0
        while chunk := os.read(fd, 1 << 20):
            total += len(chunk)
            if total > MAX_FILE_BYTES:
                raise _Refused(f"is over the limit of {_size(MAX_FILE_BYTES)} (it grew while read)")
            chunks.append(chunk)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    return b"".join(chunks), _Stat.of(after, link)


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        pos = e.start + (len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0)
        line = data.count(b"\n", 0, pos) + 1
        column = pos - (data.rfind(b"\n", 0, pos) + 1) + 1
        raise _Refused(
            f"is not UTF-8: byte 0x{data[pos]:02x} at line {line}, column {column}; save it as UTF-8"
        ) from None


@functools.cache
def _loader_limits_nesting() -> bool:
    """Whether the YAML loader refuses deep nesting by itself, as libyaml >= 0.2.5 does past 1000 levels, so that
    its recursive composer cannot exhaust the C stack (block and flow nesting both)."""
    if _LOADER is yaml.SafeLoader:
        return False
    for text in ("[" * 2000, "- " * 2000 + "x"):
        try:
            yaml.load(text, Loader=_LOADER)  # a safe loader: CSafeLoader or SafeLoader
        except yaml.YAMLError as e:
            if "nesting" not in str(e):
                return False
        else:
            return False
    return True


def _check_yaml_nesting(text: str) -> None:
    """Walk the parse events (no recursion) and refuse nesting past MAX_DEPTH before anything composes it."""
    depth = 0
    for event in yaml.parse(text, Loader=_LOADER):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                line = event.start_mark.line + 1 if event.start_mark else "?"
                raise _Refused(f"nests more than {MAX_DEPTH} levels deep (at line {line})")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _parse(path: Path, data: bytes) -> list[Any]:
    """The documents of a file: JSON (what looks like it) with orjson, else YAML with libyaml."""
    text = _decode(data)
    json_error: Exception | None = None
    first = _FIRST_CHAR.search(text)
    if first is not None and first.group() in ("{", "["):
        try:
            return [orjson.loads(text)]
        except orjson.JSONDecodeError as e:  # maybe YAML in flow style ({kind: Service, ...})
            json_error = e
    try:
        if not _loader_limits_nesting():
            _check_yaml_nesting(text)
        return list(yaml.load_all(text, Loader=_LOADER))  # a safe loader: CSafeLoader or SafeLoader
    except _Refused:
        raise
    except Exception as e:  # YAMLError, and ValueError from a bad date or an integer of 5000 digits
        if json_error is not None and path.suffix == ".json":
            raise _Refused(f"cannot parse as JSON: {json_error}") from None
        detail = str(e) if isinstance(e, yaml.YAMLError) else f"{type(e).__name__}: {e}"
        raise _Refused(f"cannot parse: {detail}") from None


def _too_deep(root: Any, limit: int) -> bool:
    """Whether collections nest more than `limit` deep in a parsed document (or it contains itself), iteratively."""
    if not isinstance(root, dict | list):
        return False
    seen: set[int] = set()
    shared = False
    stack = [(root, 1)]
    while stack:
        obj, depth = stack.pop()
        if depth > limit:
            return True
        if id(obj) in seen:  # a YAML alias: the walk below is exact where containers are shared
            shared = True
            continue
        seen.add(id(obj))
        stack.extend(
            (c, depth + 1) for c in (obj.values() if isinstance(obj, dict) else obj) if isinstance(c, dict | list)
        )
    if not shared:
        return False
    height: dict[int, int] = {}
    entered: set[int] = set()
    work: list[tuple[Any, bool]] = [(root, False)]
    while work:
        obj, done = work.pop()
        children = [c for c in (obj.values() if isinstance(obj, dict) else obj) if isinstance(c, dict | list)]
        if done:
            height[id(obj)] = 1 + max((height[id(c)] for c in children), default=0)
            if height[id(obj)] > limit:
                return True
            continue
        if id(obj) in height:
            continue
        if id(obj) in entered:  # reached again before it was finished: it contains itself
            return True
        entered.add(id(obj))
        work.append((obj, True))
        work.extend((c, False) for c in children)
    return False


def _objects_in(docs: list[Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(where, object) for each object of the documents; the items of a `kind: List` are objects too."""
    for n, doc in enumerate(docs, 1):
        if doc is None:
            continue
        if not isinstance(doc, Mapping):
            raise _Refused(f"document {n} is {_a(doc)}, not a mapping")
        if doc.get("kind") != "List":
            yield f"document {n}", doc
            continue
        items = doc.get("items")
        if items is None:
            continue
        if not isinstance(items, list):
            raise _Refused(f"document {n} (List): items is {_a(items)}, not a list")
        for i, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise _Refused(f"document {n} (List): items[{i}] is {_a(item)}, not a mapping")
            yield f"document {n} items[{i}]", item


def _identity(where: str, kind: str, doc: Mapping[str, Any]) -> ObjectId:
    """(kind, namespace, name), read as the converters read them. An object that cannot be named refuses the whole
    file: without its name there is no telling which last good version to keep."""
    meta = doc.get("metadata")
    if meta is None:
        meta = {}
    if not isinstance(meta, Mapping):
        raise _Refused(f"{where} ({kind}): metadata is {_a(meta)}, not a mapping")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise _Refused(f"{where} ({kind}): metadata.name is {'missing' if name in (None, '') else _a(name)}")
    namespace = meta.get("namespace")
    if namespace is not None and not isinstance(namespace, str):
        raise _Refused(f"{where} ({kind} {name}): metadata.namespace is {_a(namespace)}, not a string")
    return (kind, "" if kind == "Node" else namespace or "default", name)


def _label(oid: ObjectId) -> str:
    kind, namespace, name = oid
    return f"{kind} {name}" if kind == "Node" else f"{kind} {namespace}/{name}"


def _convert(kind: str, doc: Mapping[str, Any]) -> Parsed:
    if kind == "Service":
        return service_from_dict(doc)
    if kind == "EndpointSlice":
        return endpoint_slice_from_dict(doc)
    return node_from_dict(doc)


# --- the source ------------------------------------------------------------------------------------------------------


class ManifestSource:
    """The directory's objects, polled: `poll()` returns a Snapshot when what is in effect changed (see the module
    docstring for which files are read, when, and what happens to broken ones)."""

    def __init__(self, directory: Path, node_name: str) -> None:
        self.directory = directory
        self.node_name = node_name
        self._files: dict[Path, _File] = {}
        self._owner: dict[ObjectId, Path] = {}  # which file each object was taken from in the last snapshot
        self._changes = _CloseWatch()
        self._first_poll: float | None = None
        self._emitted = False

    def close(self) -> None:
        self._changes.close()

    def _scan(self) -> _Scan:
        if not self.directory.is_dir():
            raise FileNotFoundError(f"manifest directory {self.directory} does not exist")
        scan = _Scan({}, [], {})

        def unlisted(e: OSError) -> None:
            where = Path(e.filename) if e.filename else self.directory
            if where == self.directory:
                raise e
            scan.unlisted.append(where)
            scan.entries[where] = Problem(_short(f"{where}: cannot list: {e.strerror or e}"), "unreadable")

        for root, dirs, files in os.walk(self.directory, onerror=unlisted):  # followlinks=False
            here = Path(root)
            key = self._changes.watch(here)
            if key is not None:
                scan.dir_keys[here] = key
            subdirs = []
            for name in dirs:
                if name.startswith("."):
                    continue
                if (here / name).is_symlink():
                    scan.entries[here / name] = Problem(
                        f"{here / name}: a symbolic link to a directory; not followed", "unreadable"
                    )
                else:
                    subdirs.append(name)
            dirs[:] = sorted(subdirs)
            for name in files:
                if name.endswith(SUFFIXES) and not name.startswith("."):
                    entry = _stat(here / name)
                    if entry is not None:
                        scan.entries[here / name] = entry
        return scan

    def poll(self) -> Snapshot | None:
        """A full snapshot when what is in effect changed since the last poll, else None. Raises only when the
        directory itself cannot be listed (the last snapshot then stays in effect)."""
        now = time.monotonic()
        if self._first_poll is None:
            self._first_poll = now
        scan = self._scan()
        self._changes.drain()
        changed = False
        for path in list(self._files):
            if path not in scan.entries and not any(d in path.parents for d in scan.unlisted):
                del self._files[path]
                changed = True
        for path, entry in scan.entries.items():
            f = self._files.setdefault(path, _File())
            before = (f.objects, f.problems, f.note)
            try:
                self._update(path, f, entry, scan.dir_keys.get(path.parent), now)
            except Exception as e:  # a bug, or something no rule foresaw: this file only, reported
                problem = Problem(_short(f"{path}: cannot read: {type(e).__name__}: {e}"), "read_failed")
                self._settle(f, entry if isinstance(entry, _Stat) else None, [problem])
            changed |= (f.objects, f.problems, f.note) != before
        if not self._emitted:
            unsettled = any(f.changing_since is not None for f in self._files.values())
            if unsettled and now - self._first_poll < UNSETTLED_SECONDS:
                return None  # the first snapshot waits for files being written (see the module docstring)
            self._emitted = True
            return self.snapshot()
        return self.snapshot() if changed else None

    def _update(
        self, path: Path, f: _File, entry: _Stat | Problem, directory: tuple[int, int] | None, now: float
    ) -> None:
        """Bring one path's state up to date: read it if it changed and is complete."""
        if isinstance(entry, Problem):
            self._settle(f, None, [entry])
            return
        if entry == f.used:
            self._settle(f, entry, f.problems)
            return
        if f.changing_since is None:
            f.changing_since = now
        late = now - f.changing_since >= UNSETTLED_SECONDS
        if entry.size > MAX_FILE_BYTES:
            self._settle(
                f, entry, [Problem(f"{path}: is {_size(entry.size)}, over the limit of {_size(MAX_FILE_BYTES)}")]
            )
            return
        # inotify's word only counts for a file whose writes all show in this directory
        closed = (
            None if entry.link or entry.nlink > 1 or directory is None else self._changes.closed(directory, path.name)
        )
        if closed is False and not late:
            return  # being written: wait for the writer to close it
        try:
            data, after = _read_file(path, entry.link)
        except _Refused as e:
            self._settle(f, entry, [Problem(f"{path}: {e}", "unreadable")])
            return
        except FileNotFoundError:  # removed since the scan: the next poll sees it gone
            return
        except OSError as e:
            self._settle(f, entry, [Problem(_short(f"{path}: cannot read: {e.strerror or e}"), "unreadable")])
            return
        complete = after == entry
        if complete and closed and directory is not None:
            self._changes.drain()
            complete = self._changes.closed(directory, path.name) is True
        elif complete:
            digest = hashlib.blake2b(data, digest_size=16).digest()
            complete = f.pending == (entry, digest)
            f.pending = (entry, digest)
        if not complete:
            if late:
                f.note = Problem(
                    f"{path}: still being written after {UNSETTLED_SECONDS:.0f} s; its last good version stays in "
                    "effect until it is complete",
                    "incomplete",
                )
            return
        try:
            f.objects, problems = self._load(path, data, f.objects)
        except _Refused as e:
            problems = [Problem(_short(f"{path}: {e}"))]
        self._settle(f, entry, problems)

    @staticmethod
    def _settle(f: _File, used: _Stat | None, problems: list[Problem]) -> None:
        f.used = used
        f.problems = problems
        f.pending = None
        f.changing_since = None
        f.note = None

    def _load(
        self, path: Path, data: bytes, previous: dict[ObjectId, Parsed]
    ) -> tuple[dict[ObjectId, Parsed], list[Problem]]:
        """The file's objects and the problems of single objects (each keeps its last good version). Raises
        _Refused for what makes the whole file unusable."""
        docs = _parse(path, data)
        for n, doc in enumerate(docs, 1):
            if _too_deep(doc, MAX_DEPTH):
                raise _Refused(f"document {n} nests more than {MAX_DEPTH} levels deep (or contains itself)")
        objects: dict[ObjectId, Parsed] = {}
        problems: list[Problem] = []
        seen: dict[ObjectId, str] = {}
        for where, doc in _objects_in(docs):
            kind = object_kind(doc)
            if kind not in KINDS_READ:
                continue
            oid = _identity(where, kind, doc)
            if kind == "Node" and oid[2] != self.node_name:
                continue
            if oid in seen:
                problems.append(Problem(f"{path}: {_label(oid)} is in both {seen[oid]} and {where}; the first is used"))
                continue
            seen[oid] = where
            try:
                objects[oid] = _convert(kind, doc)
            except Exception as e:  # InvalidObject, or a converter tripped by what no Kubernetes object holds
                detail = str(e) if isinstance(e, InvalidObject) else f"{_label(oid)}: {type(e).__name__}: {e}"
                problems.append(Problem(_short(f"{path}: {where}: {detail}")))
                if oid in previous:
                    objects[oid] = previous[oid]  # keep the last good version in effect
        return objects, problems

    def snapshot(self) -> Snapshot:
        """Every file's objects merged, an object in several files taken from one (see the module docstring)."""
        holders: dict[ObjectId, list[Path]] = {}
        problems: list[Problem] = []
        for path in sorted(self._files):
            f = self._files[path]
            for oid in f.objects:
                holders.setdefault(oid, []).append(path)
            problems.extend(f.problems)
            if f.note is not None:
                problems.append(f.note)
        services: list[ServiceSpec] = []
        slices: list[EndpointSliceSpec] = []
        node = None
        owner: dict[ObjectId, Path] = {}
        for oid, paths in holders.items():
            winner = self._owner.get(oid)
            if winner not in paths:
                winner = paths[0]
            owner[oid] = winner
            for other in paths:
                if other != winner:
                    problems.append(
                        Problem(f"{_label(oid)} is in both {winner} and {other}; the one in {winner} is used")
                    )
            obj = self._files[winner].objects[oid]
            if isinstance(obj, ServiceSpec):
                services.append(obj)
            elif isinstance(obj, EndpointSliceSpec):
                slices.append(obj)
            else:
                node = obj
        self._owner = owner
        return Snapshot(services, slices, node, problems)


class ManifestPoller:
    """Polls a ManifestSource every `interval` seconds on its own thread, turns each changed snapshot into Replace
    events (the directory is the whole set) and each problem into one SourceError (once, until it goes away).
    Problems other than "invalid" ones, which the agent logs itself, are logged here.

    Nothing a file holds can stop the thread: files are handled one by one, and a poll that fails anyway (the
    directory vanished, a bug) is reported as a SourceError with reason "read_failed" and the next poll goes on.
    For the agent's health checks (plain attributes, safe to read from any thread):
    - `last_poll`: time.monotonic() when the last poll finished, whatever its outcome (0.0 before the first). Much
      older than `interval` means the thread is stuck (a hung filesystem, a huge file) or gone;
    - `failure`: "" when the last poll worked, else why it failed (the last good state stays in effect meanwhile);
    - `problem()`: both, and a dead thread, folded into one string for /healthz and `kpr status` ("" when well).
    """

    def __init__(
        self, source: ManifestSource, out: queue.Queue[Event], stop: threading.Event, interval: float = 0.2
    ) -> None:
        self.source = source
        self.out = out
        self.stop = stop
        self.interval = interval
        self.last_poll = 0.0
        self.failure = ""
        self.log = log.get("kpr.sources").bind(directory=str(source.directory))
        self._reported: set[str] = set()
        self.thread = threading.Thread(target=self._run, name="manifests", daemon=True)

    def start(self) -> None:
        """The first poll runs here (its snapshot, unless a file is being written, is queued before this returns);
        a directory that does not exist is an error of configuration and raises."""
        if not self.source.directory.is_dir():
            raise FileNotFoundError(f"manifest directory {self.source.directory} does not exist")
        self.poll_once()
        self.thread.start()

    def close(self) -> None:
        """Stop polling (the thread ends at its next wake-up and closes the ManifestSource itself)."""
        self.stop.set()

    def state(self) -> dict[str, dict[str, Any]]:
        """Nothing per kind to show: the directory is read whole (`problem()` says when that fails)."""
        return {}

    def _run(self) -> None:
        try:
            while not self.stop.wait(self.interval):
                self.poll_once()
        finally:
            self.source.close()

    def poll_once(self) -> None:
        """One poll. Never raises."""
        try:
            snapshot = self.source.poll()
        except Exception as e:
            self._failed(e)
            return
        finally:
            self.last_poll = time.monotonic()
        if self.failure:
            self.log.info("manifest directory readable again")
            self.failure = ""
        if snapshot is None:
            return
        for p in snapshot.problems:
            if p.message not in self._reported:
                self.out.put(SourceError(None, p.message, p.reason))
                if p.reason != "invalid":
                    self.log.warning("manifest not used", reason=p.reason, error=p.message)
        self._reported = {p.message for p in snapshot.problems}
        self.out.put(Replace("Service", tuple(snapshot.services)))
        self.out.put(Replace("EndpointSlice", tuple(snapshot.slices)))
        self.out.put(Replace("Node", (snapshot.node,) if snapshot.node else ()))

    def _failed(self, e: Exception) -> None:
        message = _short(f"{self.source.directory}: poll failed: {type(e).__name__}: {e}")
        if message != self.failure:  # once per distinct failure, not every interval
            self.out.put(SourceError(None, message, "read_failed"))
            if isinstance(e, OSError):
                self.log.error("cannot read the manifest directory; what it held stays in effect", error=message)
            else:
                self.log.exception("manifest poll failed; what the directory held stays in effect", error=message)
        self.failure = message

    def problem(self, stalled_after: float = 60.0) -> str:
        """Why the manifests may not be followed, or "" (stalled_after: seconds without a finished poll)."""
        if self.thread.ident is not None and not self.thread.is_alive() and not self.stop.is_set():
            return f"the manifest reader of {self.source.directory} has stopped"
        age = time.monotonic() - self.last_poll
        if self.last_poll and age > stalled_after:
            return f"no poll of {self.source.directory} finished for {age:.0f} s"
        return self.failure

    def report(self, kind: Kind, namespace: str, name: str, reason: str, message: str) -> None:
        """Nothing to write to: the agent's log line (and its metric) is the report."""
