"""The search cache: normalized keys, SQLite (one machine) or Redis (several replicas), snapshots.

A snapshot is gzipped JSONL of every entry, written to a local path or an `s3://` URI, so one run's
searches can be replayed by the next, or shipped to an air-gapped cluster. Per-run budget counters
live in the same store, so replicas share them.
"""

from __future__ import annotations

import abc
import gzip
import hashlib
import io
import json
import sqlite3
import threading
import time
import unicodedata
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from argus.config import SearchSettings, StackSettings
from argus.storage import read_uri, write_uri


def normalize_query(query: str) -> str:
    """Same words, same key: Unicode-normalized, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", query).casefold().split())


def cache_key(kind: str, backend: str, query: str, params: dict[str, Any]) -> str:
    material = json.dumps([kind, backend, normalize_query(query), params], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(material.encode()).hexdigest()


@dataclass
class Entry:
    key: str
    kind: str
    backend: str
    query: str
    params: dict[str, Any]
    value: Any
    created: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Entry:
        return cls(**json.loads(text))


class CacheStore(abc.ABC):
    @abc.abstractmethod
    async def get(self, key: str) -> Entry | None: ...

    @abc.abstractmethod
    async def put(self, entry: Entry) -> None: ...

    @abc.abstractmethod
    def entries(self) -> AsyncIterator[Entry]: ...

    @abc.abstractmethod
    async def incr_budget(self, run_id: str) -> int:
        """Count one upstream call for `run_id`; returns the new total."""

    @abc.abstractmethod
    async def budget_used(self, run_id: str) -> int: ...

    async def stats(self) -> dict[str, Any]:
        by_kind: dict[str, int] = {}
        total = 0
        async for entry in self.entries():
            total += 1
            label = f"{entry.kind}/{entry.backend}"
            by_kind[label] = by_kind.get(label, 0) + 1
        return {"entries": total, "by_kind": by_kind}

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        pass


class SQLiteStore(CacheStore):
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._con = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._con.execute("PRAGMA journal_mode=WAL")
        self._con.execute("PRAGMA synchronous=NORMAL")
        self._con.execute("CREATE TABLE IF NOT EXISTS cache (key TEXT PRIMARY KEY, entry TEXT NOT NULL)")
        self._con.execute("CREATE TABLE IF NOT EXISTS budget (run_id TEXT PRIMARY KEY, used INTEGER NOT NULL)")
        self._lock = threading.Lock()

    async def get(self, key: str) -> Entry | None:
        with self._lock:
            row = self._con.execute("SELECT entry FROM cache WHERE key = ?", (key,)).fetchone()
        return Entry.from_json(row[0]) if row else None

    async def put(self, entry: Entry) -> None:
        with self._lock:
            self._con.execute("INSERT OR REPLACE INTO cache VALUES (?, ?)", (entry.key, entry.to_json()))

    async def entries(self) -> AsyncIterator[Entry]:
        with self._lock:
            rows = self._con.execute("SELECT entry FROM cache ORDER BY key").fetchall()
        for (text,) in rows:
            yield Entry.from_json(text)

    async def incr_budget(self, run_id: str) -> int:
        with self._lock:
            row = self._con.execute(
                "INSERT INTO budget VALUES (?, 1) ON CONFLICT(run_id) DO UPDATE SET used = used + 1 RETURNING used",
                (run_id,),
            ).fetchone()
        return int(row[0])

    async def budget_used(self, run_id: str) -> int:
        with self._lock:
            row = self._con.execute("SELECT used FROM budget WHERE run_id = ?", (run_id,)).fetchone()
        return int(row[0]) if row else 0

    async def aclose(self) -> None:
        self._con.close()


class RedisStore(CacheStore):
    PREFIX = "argus:search:"

    def __init__(self, url: str):
        self._redis = aioredis.from_url(url)

    async def get(self, key: str) -> Entry | None:
        raw = await self._redis.get(f"{self.PREFIX}cache:{key}")
        return Entry.from_json(raw) if raw else None

    async def put(self, entry: Entry) -> None:
        await self._redis.set(f"{self.PREFIX}cache:{entry.key}", entry.to_json())

    async def entries(self) -> AsyncIterator[Entry]:
        keys = sorted([k async for k in self._redis.scan_iter(match=f"{self.PREFIX}cache:*", count=1000)])
        for i in range(0, len(keys), 500):
            for raw in await self._redis.mget(keys[i : i + 500]):
                if raw:
                    yield Entry.from_json(raw)

    async def incr_budget(self, run_id: str) -> int:
        return int(await self._redis.incr(f"{self.PREFIX}budget:{run_id}"))

    async def budget_used(self, run_id: str) -> int:
        raw = await self._redis.get(f"{self.PREFIX}budget:{run_id}")
        return int(raw) if raw else 0

    async def ping(self) -> bool:
        return bool(await self._redis.ping())

    async def aclose(self) -> None:
        await self._redis.aclose()


def make_store(settings: SearchSettings) -> CacheStore:
    return RedisStore(settings.redis_url) if settings.cache_store == "redis" else SQLiteStore(settings.cache_path)


# -- snapshots -----------------------------------------------------------------------------------------


async def export_snapshot(store: CacheStore, dest: str, stack: StackSettings | None = None) -> int:
    buf = io.BytesIO()
    count = 0
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        async for entry in store.entries():
            gz.write((entry.to_json() + "\n").encode())
            count += 1
    write_uri(dest, buf.getvalue(), stack)
    return count


async def import_snapshot(store: CacheStore, src: str, stack: StackSettings | None = None) -> int:
    data = read_uri(src, stack)
    count = 0
    for n, line in enumerate(gzip.decompress(data).decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = Entry.from_json(line)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{src}: line {n} is not a cache entry: {exc}") from exc
        await store.put(entry)
        count += 1
    return count
