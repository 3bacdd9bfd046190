"""The simulated API server shared by instance processes: the agent tests' in-memory
``SimulatedApiServer`` (registered nodes, bootstrap tokens, control-plane etcd endpoints), kept in one
JSON file under an ``fcntl`` lock so that separate processes (one per instance) see the same object.
Same attributes as ``tests.agent.kubeadm_emulator.SimulatedApiServer``; every read loads the file.
"""

from __future__ import annotations

import fcntl
import json
import threading
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

_KEYS = ("nodes", "tokens", "etcd_endpoints", "objects")


class _FileLock:
    """Reentrant across threads of a process, exclusive across processes (flock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._rlock = threading.RLock()
        self._depth = 0

    def __enter__(self) -> _FileLock:
        self._rlock.acquire()
        if self._depth == 0:
            self._file = open(self.path, "a+")
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
        self._rlock.release()


class FileApiServer:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = _FileLock(path.with_suffix(".lock"))
        with self.lock:
            if not path.exists():
                self._save({"nodes": {}, "tokens": [], "etcd_endpoints": {}})

    def _load(self) -> dict[str, Any]:
        with self.lock:
            doc = dict(json.loads(self.path.read_text()))
            doc.setdefault("objects", {})  # simulated API objects (kubeadm-config, upgrade events)
            return doc

    def _save(self, doc: dict[str, Any]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        tmp.replace(self.path)

    def _update(self, key: str, fn: Any) -> Any:
        with self.lock:
            doc = self._load()
            out = fn(doc[key])
            self._save(doc)
            return out

    @property
    def nodes(self) -> _FileDict:
        return _FileDict(self, "nodes")

    @property
    def etcd_endpoints(self) -> _FileDict:
        return _FileDict(self, "etcd_endpoints")

    @property
    def objects(self) -> _FileDict:
        return _FileDict(self, "objects")

    @property
    def tokens(self) -> _FileSet:
        return _FileSet(self)

    @tokens.setter
    def tokens(self, value: set[str]) -> None:
        with self.lock:
            doc = self._load()
            doc["tokens"] = sorted(value)
            self._save(doc)


class _FileDict(MutableMapping[str, str]):
    def __init__(self, api: FileApiServer, key: str) -> None:
        self.api = api
        self.key = key

    def _data(self) -> dict[str, str]:
        return dict(self.api._load()[self.key])

    def __getitem__(self, k: str) -> str:
        return self._data()[k]

    def __setitem__(self, k: str, v: str) -> None:
        self.api._update(self.key, lambda d: d.__setitem__(k, v))

    def __delitem__(self, k: str) -> None:
        self.api._update(self.key, lambda d: d.__delitem__(k))

    def __iter__(self) -> Iterator[str]:
        return iter(self._data())

    def __len__(self) -> int:
        return len(self._data())


class _FileSet:
    def __init__(self, api: FileApiServer) -> None:
        self.api = api

    def _data(self) -> set[str]:
        return set(self.api._load()["tokens"])

    def add(self, token: str) -> None:
        self.api._update("tokens", lambda t: None if token in t else t.append(token))

    def update(self, tokens: Any) -> None:
        for t in tokens:
            self.add(t)

    def __contains__(self, token: object) -> bool:
        return token in self._data()

    def __iter__(self) -> Iterator[str]:
        return iter(self._data())
