"""Packaging: the distribution declares what the code imports, and each program's extra is enough."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("argus", "flows", "trainers", "services", "operators")
# The extra each part of the tree runs with (its image's); everything else is the `all` of this machine.
EXTRA_OF = {"services/sandbox": "sandbox", "services/search": "search", "operators": "operator", "trainers": "trainer"}


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _project() -> dict[str, object]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]  # type: ignore[no-any-return]


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m not in (*PACKAGES, "__future__")}


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level modules imported by each file (sandbox kernels run in their own virtualenv: not ours)."""
    out = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            if "kernel" not in path.relative_to(REPO).parts:
                out[path.relative_to(REPO).as_posix()] = _imports(path)
    return out


def test_every_imported_module_is_declared_and_every_declared_dependency_is_imported() -> None:
    project = _project()
    extras: dict[str, list[str]] = project["optional-dependencies"]  # type: ignore[assignment]
    declared = {_name(r) for r in project["dependencies"]}  # type: ignore[attr-defined]
    for name, reqs in extras.items():
        if name != "dev":
            declared |= {_name(r) for r in reqs if not r.startswith("argus[")}
    providers = importlib.metadata.packages_distributions()
    imported = {m for mods in _third_party_imports().values() for m in mods} - {"mypy_boto3_s3"}  # typing only
    missing = {m: providers.get(m) for m in imported if not {_name(d) for d in providers.get(m, [])} & declared}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    used = {_name(d) for m in imported for d in providers.get(m, [])}
    unused = declared - used
    assert not unused, f"declared in pyproject.toml but never imported: {sorted(unused)}"


def test_each_programs_extra_covers_what_it_imports() -> None:
    project = _project()
    extras: dict[str, list[str]] = project["optional-dependencies"]  # type: ignore[assignment]
    base = {_name(r) for r in project["dependencies"]}  # type: ignore[attr-defined]
    providers = importlib.metadata.packages_distributions()
    for file, modules in _third_party_imports().items():
        extra = next((e for prefix, e in EXTRA_OF.items() if file.startswith(prefix)), None)
        if extra is None:
            continue
        allowed = base | {_name(r) for r in extras[extra]}
        for module in modules:
            dists = {_name(d) for d in providers.get(module, [])}
            assert dists & allowed, f"{file} imports {module} ({dists}), which the {extra!r} extra does not install"


def test_the_cli_starts_with_only_the_base_dependencies() -> None:
    """`argus sandbox serve` is the sandbox image's entrypoint: the CLI's top level may import nothing
    that only other programs' extras install."""
    heavy = ["prefect", "mlflow", "torch", "transformers", "deepspeed", "kubernetes", "kopf", "moto", "fastapi"]
    code = (
        "import sys\n"
        f"for name in {heavy!r}:\n"
        "    sys.modules[name] = None  # importing it now raises ImportError\n"
        "from argus.cli import app\n"
        "app(['--help'], standalone_mode=False)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "sandbox" in out.stdout and "run" in out.stdout
