"""DeepEyesV2's data formats, read and written at local paths or s3:// URIs.

- SFT: LLaMA-Factory "sharegpt" json, `[{"messages": [{"role", "content"}], "images": [paths]}]`, one
  `<image>` placeholder in the messages per image, in order. Relative image paths resolve against the
  json's directory (DeepEyesV2's `data_convert.py` makes them absolute; both load).
- RL / eval: verl parquet rows: `data_source`, `prompt` (chat list), `images` (`{"bytes", "path"}`
  structs, or plain paths), `ability`, `env_name`, `reward_model.ground_truth`, `extra_info.index`.
- Image-search cache: MMSearch-R1's json, `{key: {"tool_returned_web_title": [...],
  "cached_images_path": [...]}}`.

Every error names the file and the row.
"""

from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from argus.agent.prompts import opening
from argus.agent.task import Task
from argus.config import Prompt, StackSettings
from argus.storage import is_s3, join_uri, read_uri, write_uri

ROLES = ("system", "user", "assistant")
IMAGE_TOKEN = "<image>"
ENV_NAME = "argus_deepeyesv2"


class DataFormatError(ValueError):
    pass


def _parent(uri: str) -> str:
    return posixpath.dirname(uri) if is_s3(uri) else str(Path(uri).parent)


def _resolve(base_dir: str, path: str) -> str:
    if is_s3(path) or path.startswith("/"):
        return path
    return join_uri(base_dir, path)


# -- SFT: sharegpt -----------------------------------------------------------------------------------


@dataclass
class SFTExample:
    messages: list[dict[str, str]]
    images: list[str] = field(default_factory=list)  # resolved URIs


def read_sharegpt(
    uri: str, *, image_root: str | None = None, check_images: bool = True, settings: StackSettings | None = None
) -> list[SFTExample]:
    try:
        data = json.loads(read_uri(uri, settings))
    except (OSError, ValueError) as exc:
        raise DataFormatError(f"{uri}: cannot read sharegpt json: {exc}") from exc
    if not isinstance(data, list):
        raise DataFormatError(f"{uri}: expected a list of examples, got {type(data).__name__}")
    base = image_root or _parent(uri)
    out = []
    for i, row in enumerate(data):
        where = f"{uri}: row {i}"
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list) or not row["messages"]:
            raise DataFormatError(f"{where}: needs a non-empty 'messages' list")
        placeholders = 0
        for j, msg in enumerate(row["messages"]):
            if not isinstance(msg, dict) or msg.get("role") not in ROLES:
                role = msg.get("role") if isinstance(msg, dict) else msg
                raise DataFormatError(f"{where}: message {j} has role {role!r}; expected one of {', '.join(ROLES)}")
            if not isinstance(msg.get("content"), str):
                raise DataFormatError(f"{where}: message {j} content must be a string")
            placeholders += msg["content"].count(IMAGE_TOKEN)
        images = row.get("images") or []
        if placeholders != len(images):
            raise DataFormatError(f"{where}: {placeholders} {IMAGE_TOKEN} placeholders but {len(images)} images")
        resolved = [_resolve(base, p) for p in images]
        if check_images:
            for p in resolved:
                if not is_s3(p) and not Path(p).is_file():
                    raise DataFormatError(f"{where}: image {p} does not exist")
        out.append(SFTExample(messages=row["messages"], images=resolved))
    return out


def write_sharegpt(
    uri: str, examples: list[tuple[list[dict[str, str]], list[bytes]]], settings: StackSettings | None = None
) -> None:
    """Images go to `images/` beside the json, referenced by relative paths."""
    base = _parent(uri)
    rows = []
    for i, (messages, images) in enumerate(examples):
        paths = []
        for k, png in enumerate(images):
            rel = f"images/{i:06d}_{k:02d}.png"
            write_uri(join_uri(base, rel), png, settings)
            paths.append(rel)
        rows.append({"messages": messages, "images": paths})
    write_uri(uri, json.dumps(rows, indent=1, ensure_ascii=False).encode(), settings)


# -- RL / eval: verl parquet ------------------------------------------------------------------------


def task_to_row(
    task: Task, index: int, data_source: str = "argus_mini", prompt: Prompt = "deepeyesv2"
) -> dict[str, Any]:
    return {
        "data_source": data_source,
        "prompt": opening(prompt, task.question),
        "images": [{"bytes": task.image, "path": None}],
        "ability": task.family,
        "env_name": ENV_NAME,
        "reward_model": {"style": "rule", "ground_truth": task.answer},
        "extra_info": {
            "index": index,
            "task_id": task.id,
            "question": task.question,
            "family": task.family,
            "slice": task.slice,
            "answer_type": task.answer_type,
            "tolerance": task.tolerance,
            "image_search_key": task.image_search_key or "",
        },
    }


def write_rl_parquet(
    uri: str, tasks: list[Task], settings: StackSettings | None = None, prompt: Prompt = "deepeyesv2"
) -> None:
    table = pa.Table.from_pylist([task_to_row(t, i, prompt=prompt) for i, t in enumerate(tasks)])
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_uri(uri, buf.getvalue(), settings)


def read_rl_parquet(uri: str, settings: StackSettings | None = None) -> list[Task]:
    """Tasks of a verl parquet file: ours, or DeepEyesV2's own (question from extra_info or the prompt)."""
    try:
        # ParquetFile and no threads: read_table goes through the dataset scanner, whose worker threads
        # can outlive the interpreter and abort it at exit ("terminate called without an active
        # exception", apache/arrow#34314); these files are small enough for one thread.
        table = pq.ParquetFile(io.BytesIO(read_uri(uri, settings))).read(use_threads=False)
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataFormatError(f"{uri}: cannot read parquet: {exc}") from exc
    base = _parent(uri)
    tasks = []
    for i, row in enumerate(table.to_pylist()):
        where = f"{uri}: row {i}"
        try:
            extra = row.get("extra_info") or {}
            ground_truth = row["reward_model"]["ground_truth"]
            question = extra.get("question") or _question_from_prompt(row["prompt"])
            image = _first_image(row.get("images") or [], base, settings)
        except (KeyError, TypeError, IndexError, OSError) as exc:
            raise DataFormatError(f"{where}: {type(exc).__name__}: {exc}") from exc
        tasks.append(
            Task(
                id=str(extra.get("task_id") or extra.get("index", i)),
                family=str(extra.get("family") or row.get("ability") or row.get("data_source") or "unknown"),
                question=question,
                answer=str(ground_truth),
                image=image,
                answer_type=extra.get("answer_type") or "exact",
                tolerance=float(extra.get("tolerance") or 0.0),
                image_search_key=extra.get("image_search_key") or None,
                slice=str(extra.get("slice") or ""),
                extra={"index": extra.get("index", i), "data_source": row.get("data_source")},
            )
        )
    return tasks


def _question_from_prompt(prompt: list[dict[str, Any]]) -> str:
    user = next(m["content"] for m in prompt if m["role"] == "user")
    text = user if isinstance(user, str) else " ".join(c.get("text", "") for c in user)
    return text.replace(IMAGE_TOKEN, "").split("\n\nYou must put your answer")[0].strip()


def _first_image(images: list[Any], base: str, settings: StackSettings | None) -> bytes:
    if not images:
        return b""
    first = images[0]
    if isinstance(first, dict):
        if first.get("bytes"):
            return bytes(first["bytes"])
        first = first.get("path")
    if not first:
        return b""
    return read_uri(_resolve(base, str(first)), settings)


# -- MMSearch-R1 image-search cache -----------------------------------------------------------------------


def write_image_search_cache(
    uri: str, entries: dict[str, list[tuple[str, bytes]]], settings: StackSettings | None = None
) -> None:
    base = _parent(uri)
    cache: dict[str, dict[str, list[str]]] = {}
    for key, results in sorted(entries.items()):
        titles, paths = [], []
        for k, (title, png) in enumerate(results):
            rel = f"cached_images/{key}_{k:02d}.png"
            write_uri(join_uri(base, rel), png, settings)
            titles.append(title)
            paths.append(rel)
        cache[key] = {"tool_returned_web_title": titles, "cached_images_path": paths}
    write_uri(uri, json.dumps(cache, indent=1, ensure_ascii=False).encode(), settings)


def read_image_search_cache(uri: str, settings: StackSettings | None = None) -> dict[str, list[tuple[str, str]]]:
    try:
        data = json.loads(read_uri(uri, settings))
    except (OSError, ValueError) as exc:
        raise DataFormatError(f"{uri}: cannot read image-search cache: {exc}") from exc
    if not isinstance(data, dict):
        raise DataFormatError(f"{uri}: expected an object keyed by dataset index")
    base = _parent(uri)
    out = {}
    for key, entry in data.items():
        titles = entry.get("tool_returned_web_title")
        paths = entry.get("cached_images_path")
        if not isinstance(titles, list) or not isinstance(paths, list):
            raise DataFormatError(f"{uri}: key {key!r} needs 'tool_returned_web_title' and 'cached_images_path' lists")
        out[str(key)] = [(t, _resolve(base, p)) for t, p in zip(titles, paths, strict=False)]
    return out
