"""The offline search index: one SQLite file, portable to an air-gapped cluster. The data generator and
`argus search index` write it; the search proxy's offline provider reads it.

- text: an FTS5 full-text index (BM25 ranking) over a JSONL corpus, one document per line:
  `{"id", "title", "text" | "contents", "url", "date"}` (Search-R1's `{"id", "contents": "Title\\ntext"}`
  corpora load as they are);
- images: the images of a JSONL image corpus (`{"id", "title", "url", "image": path}`) stored with
  their 64-bit perceptual hash, searched by Hamming distance;
- cached image search: the MMSearch-R1 / DeepEyesV2 cache json
  (`{key: {"tool_returned_web_title": [...], "cached_images_path": [...]}}`), looked up by key.
"""

from __future__ import annotations

import io
import json
import re
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
from PIL import Image, UnidentifiedImageError

SCHEMA = """
CREATE VIRTUAL TABLE IF NOT EXISTS docs USING fts5(doc_id UNINDEXED, title, body, url UNINDEXED, date UNINDEXED);
CREATE TABLE IF NOT EXISTS images (
    image_id TEXT PRIMARY KEY, title TEXT NOT NULL, url TEXT, phash INTEGER NOT NULL, data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS image_cache (
    key TEXT NOT NULL, position INTEGER NOT NULL, title TEXT NOT NULL, data BLOB,
    PRIMARY KEY (key, position)
);
"""
_TOKEN = re.compile(r"\w+", re.UNICODE)


class CorpusError(ValueError):
    """A corpus file that cannot be indexed; names the file and line."""


def image_phash(data: bytes, max_pixels: int | None = None) -> int:
    """The perceptual hash of an image; ValueError with the reason for bytes that are not an image, or
    an image over `max_pixels` (checked from its header, before anything is decoded)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise ValueError(
                    f"image is {img.width}x{img.height} = {img.width * img.height} pixels; the limit is {max_pixels}"
                )
            bits = imagehash.phash(img.convert("RGB")).hash.flatten()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"not a readable image: {exc}") from exc
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    # SQLite integers are signed 64-bit.
    return value - (1 << 64) if value >= 1 << 63 else value


def _jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise CorpusError(f"{path}:{n}: invalid JSON: {exc}") from exc
            if not isinstance(row, dict):
                raise CorpusError(f"{path}:{n}: expected an object")
            yield n, row


def build_index(
    out: Path, *, corpus: Path | None = None, images: Path | None = None, mmsearch_cache: Path | None = None
) -> dict[str, int]:
    """Create or extend the index at `out`; returns how many of each kind were added."""
    out.parent.mkdir(parents=True, exist_ok=True)
    counts = {"docs": 0, "images": 0, "cached_keys": 0}
    con = sqlite3.connect(out)
    try:
        con.executescript(SCHEMA)
        with con:
            if corpus is not None:
                for n, row in _jsonl(corpus):
                    body = row.get("text", row.get("contents"))
                    if not isinstance(body, str):
                        raise CorpusError(f"{corpus}:{n}: a document needs 'text' or 'contents'")
                    title = row.get("title")
                    if title is None:  # Search-R1: the first line of contents is the title
                        title, _, body = body.partition("\n")
                        title = title.strip().strip('"')
                    con.execute(
                        "INSERT INTO docs VALUES (?, ?, ?, ?, ?)",
                        (str(row.get("id", n)), title, body, row.get("url", ""), row.get("date")),
                    )
                    counts["docs"] += 1
            if images is not None:
                for n, row in _jsonl(images):
                    try:
                        data = (images.parent / row["image"]).read_bytes()
                        phash = image_phash(data)
                    except (KeyError, OSError, ValueError) as exc:
                        raise CorpusError(f"{images}:{n}: {exc}") from exc
                    con.execute(
                        "INSERT OR REPLACE INTO images VALUES (?, ?, ?, ?, ?)",
                        (str(row.get("id", n)), row.get("title", ""), row.get("url"), phash, data),
                    )
                    counts["images"] += 1
            if mmsearch_cache is not None:
                counts["cached_keys"] = _import_mmsearch(con, mmsearch_cache)
    finally:
        con.close()
    return counts


def _import_mmsearch(con: sqlite3.Connection, path: Path) -> int:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CorpusError(f"{path}: {exc}") from exc
    if not isinstance(cache, dict):
        raise CorpusError(f"{path}: expected an object keyed by dataset index")
    for key, entry in cache.items():
        titles = entry.get("tool_returned_web_title") or []
        paths = entry.get("cached_images_path") or []
        for pos, title in enumerate(titles):
            data = None
            if pos < len(paths) and paths[pos]:
                image_path = path.parent / paths[pos]
                data = image_path.read_bytes() if image_path.exists() else None
            con.execute("INSERT OR REPLACE INTO image_cache VALUES (?, ?, ?, ?)", (str(key), pos, title, data))
    return len(cache)


class OfflineIndex:
    def __init__(self, path: Path):
        if not path.exists():
            raise FileNotFoundError(f"offline search index {path} does not exist (build it: argus search index)")
        self.path = path
        self._con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        self._lock = threading.Lock()
        rows = self._con.execute("SELECT image_id, title, url, phash FROM images").fetchall()
        self._image_meta = [(r[0], r[1], r[2]) for r in rows]
        self._hashes = np.array([r[3] for r in rows], dtype=np.int64).view(np.uint64)

    def stats(self) -> dict[str, int]:
        with self._lock:
            docs = self._con.execute("SELECT count(*) FROM docs").fetchone()[0]
            keys = self._con.execute("SELECT count(DISTINCT key) FROM image_cache").fetchone()[0]
        return {"docs": int(docs), "images": len(self._image_meta), "cached_keys": int(keys)}

    def search(self, query: str, k: int) -> list[tuple[dict[str, Any], float]]:
        tokens = _TOKEN.findall(query.lower())
        if not tokens:
            return []
        match = " OR ".join(f'"{t}"' for t in dict.fromkeys(tokens))
        with self._lock:
            rows = self._con.execute(
                "SELECT doc_id, title, body, url, date, bm25(docs, 0.0, 3.0, 1.0) AS rank FROM docs "
                "WHERE docs MATCH ? ORDER BY rank LIMIT ?",
                (match, k),
            ).fetchall()
        return [({"id": r[0], "title": r[1], "text": r[2], "url": r[3], "date": r[4]}, -float(r[5])) for r in rows]

    def image_search(self, data: bytes, k: int) -> list[tuple[dict[str, Any], int]]:
        if not len(self._hashes):
            return []
        query = np.array([image_phash(data)], dtype=np.int64).view(np.uint64)[0]
        distances = np.bitwise_count(np.bitwise_xor(self._hashes, query))
        order = np.argsort(distances, kind="stable")[:k]
        out = []
        for i in order:
            image_id, title, url = self._image_meta[int(i)]
            with self._lock:
                blob = self._con.execute("SELECT data FROM images WHERE image_id = ?", (image_id,)).fetchone()[0]
            out.append(({"id": image_id, "title": title, "url": url, "data": blob}, int(distances[i])))
        return out

    def cached_images(self, key: str, k: int) -> list[dict[str, Any]] | None:
        with self._lock:
            rows = self._con.execute(
                "SELECT title, data FROM image_cache WHERE key = ? ORDER BY position LIMIT ?", (key, k)
            ).fetchall()
        if not rows:
            return None
        return [{"title": r[0], "data": r[1]} for r in rows]
