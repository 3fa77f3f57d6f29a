"""Load a pipeline spec from YAML and report every problem as `file:line: field.path: message`."""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from argus.config import PipelineSpec, semantic_errors

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class SpecIssue:
    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path or '<top level>'}: {self.message}"


class SpecError(Exception):
    def __init__(self, issues: list[SpecIssue]):
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


class _Document:
    """A YAML document as plain data plus the line of every key and item, by field path."""

    def __init__(self, file: str, text: str):
        self.file = file
        self.lines: dict[Loc, int] = {}
        self.issues: list[SpecIssue] = []
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            self.data: Any = loader.construct_document(node) if node is not None else None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            problem = getattr(exc, "problem", None) or str(exc)
            raise SpecError([SpecIssue(file, line, "", f"invalid YAML: {problem}")]) from exc
        finally:
            loader.dispose()
        if node is not None:
            self._index(node, ())

    def _index(self, node: yaml.Node, loc: Loc) -> None:
        self.lines.setdefault(loc, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in node.value:
                key = key_node.value
                if key in seen:
                    # PyYAML keeps the last value silently; a duplicated key is almost always a mistake.
                    self.issues.append(
                        SpecIssue(self.file, key_node.start_mark.line + 1, _dotted((*loc, key)), "duplicate key")
                    )
                seen.add(key)
                self.lines[(*loc, key)] = key_node.start_mark.line + 1
                self._index(value_node, (*loc, key))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._index(item, (*loc, i))

    def line_of(self, loc: Loc) -> int | None:
        while loc not in self.lines and loc:
            loc = loc[:-1]
        return self.lines.get(loc)


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(model: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    """The pydantic model that validates the mapping at `loc` (to suggest field names)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            current = _item_type(current, list)
            continue
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = _unwrap(field.annotation)
        else:  # a dict[str, Model] value
            current = _item_type(current, dict)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else annotation
    if typing.get_origin(annotation) is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    return annotation


def _item_type(annotation: Any, container: type) -> Any:
    if typing.get_origin(annotation) is container:
        return _unwrap(typing.get_args(annotation)[-1])
    return None


def _message(err: Any, loc: Loc) -> str:
    if err["type"] == "extra_forbidden":
        model = _model_at(PipelineSpec, loc[:-1])
        msg = "unknown key"
        if model is not None:
            close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
            msg += f" (did you mean '{close[0]}'?)" if close else f" (allowed: {', '.join(model.model_fields)})"
        return msg
    if err["type"] == "missing":
        return "required field is missing"
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ")


def parse_spec(text: str, file: str = "<string>") -> PipelineSpec:
    doc = _Document(file, text)
    if doc.data is None:
        raise SpecError([SpecIssue(file, None, "", "the file is empty")])
    if not isinstance(doc.data, dict):
        raise SpecError([SpecIssue(file, 1, "", f"expected a mapping at the top level, got {type(doc.data).__name__}")])
    try:
        spec = PipelineSpec.model_validate(doc.data)
    except ValidationError as exc:
        issues = list(doc.issues)
        for err in exc.errors():
            loc: Loc = tuple(err["loc"])
            issues.append(SpecIssue(file, doc.line_of(loc), _dotted(loc), _message(err, loc)))
        raise SpecError(issues) from None
    issues = list(doc.issues)
    for loc, msg in semantic_errors(spec):
        issues.append(SpecIssue(file, doc.line_of(loc), _dotted(loc), msg))
    if issues:
        raise SpecError(issues)
    return spec


def load_spec(path: str | Path) -> PipelineSpec:
    """A spec from a local file or an s3:// object (deployments take a spec URI)."""
    from argus.storage import is_s3, read_uri

    try:
        text = read_uri(path).decode() if is_s3(path) else Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise SpecError([SpecIssue(str(path), None, "", f"cannot read the file: {reason}")]) from exc
    return parse_spec(text, str(path))
