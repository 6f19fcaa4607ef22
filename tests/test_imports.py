"""The import graph of the project, read from the source (ast): the library never reaches up into the jobs
or the app, no job imports another job, and the library's modules import each other without a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

from pipelines.cli import JOBS

ROOT = Path(__file__).resolve().parents[1]
SHARED_JOB_MODULES = {"pipelines", "pipelines.common", "pipelines.cli"}  # helpers every job may use


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: str) -> dict[str, Path]:
    return {module_name(path): path for path in sorted((ROOT / package).rglob("*.py"))}


ALL_MODULES = {**modules("retrieval"), **modules("pipelines"), **modules("app")}


def resolve(module: str, is_package: bool, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The modules an import statement loads (``from a import b`` loads ``a.b`` when that is a project module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the importing module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    found = [base] if base else []
    found += [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in ALL_MODULES]
    return found


def module_level(tree: ast.Module):
    """Import statements run when the module is imported: not in functions, nor under ``if TYPE_CHECKING``."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            pending.extend(node.orelse)
        elif isinstance(node, (ast.If, ast.Try, ast.With, ast.ClassDef)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                pending.extend(getattr(node, field, []))
        elif isinstance(node, ast.ExceptHandler):
            pending.extend(node.body)


def imports_in(source: str, module: str, is_package: bool = False, anywhere: bool = True) -> set[str]:
    """Modules a module's source imports: all of them, or (``anywhere=False``) those imported when it loads."""
    tree = ast.parse(source)
    nodes = (n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))) if anywhere else \
        module_level(tree)
    return {name for node in nodes for name in resolve(module, is_package, node)}


def imports(module: str, anywhere: bool = True) -> set[str]:
    path = ALL_MODULES[module]
    return imports_in(path.read_text(encoding="utf-8"), module, path.name == "__init__.py", anywhere)


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


SAMPLE = """
from __future__ import annotations
import json
from typing import TYPE_CHECKING
import retrieval.config
from retrieval.data import list_shards
from retrieval.models import backbones
from . import shards
from ..io import atomic_path
if TYPE_CHECKING:
    from retrieval.checkpoint import LoadedModel
try:
    from retrieval.text import tokenize
except ImportError:
    from retrieval.errors import DataError


class Holder:
    from retrieval.index import VectorIndex


def later():
    from retrieval.search import Searcher
"""


def test_imports_are_read_from_the_source():
    loaded = {"__future__", "json", "typing", "retrieval.config", "retrieval.data", "retrieval.models",
              "retrieval.models.backbones", "retrieval.data.shards", "retrieval.io",
              "retrieval.text", "retrieval.errors", "retrieval.index"}
    assert imports_in(SAMPLE, "retrieval.data.prepare", anywhere=False) == loaded
    assert imports_in(SAMPLE, "retrieval.data.prepare") == loaded | {"retrieval.checkpoint", "retrieval.search"}
    assert "retrieval.data.shards" in imports_in(SAMPLE, "retrieval.data", is_package=True)


def test_library_never_imports_jobs_or_app():
    offending = {module: sorted(name for name in imports(module) if within(name, "pipelines") or within(name, "app"))
                 for module in modules("retrieval")}
    assert {module: names for module, names in offending.items() if names} == {}


def test_no_job_imports_another_job():
    jobs = {f"pipelines.{job}" for job in JOBS}
    assert set(modules("pipelines")) == jobs | SHARED_JOB_MODULES  # every module is a job or a shared helper
    offending = {job: sorted(imports(job) & (jobs - {job})) for job in jobs}
    assert {job: names for job, names in offending.items() if names} == {}
    shared = {module: sorted(imports(module) & jobs) for module in SHARED_JOB_MODULES}
    assert {module: names for module, names in shared.items() if names} == {}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (as a path that returns to its start), or None."""
    state: dict[str, str] = {}
    trail: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        trail.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return trail[trail.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        trail.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_no_import_cycle_among_library_modules():
    library = modules("retrieval")
    graph = {module: {name for name in imports(module, anywhere=False) if name in library and name != module}
             for module in library}
    assert find_cycle(graph) is None
