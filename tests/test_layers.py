"""The import floors (docs/ARCHITECTURE.md): `dlm` at the bottom; `app`, `train`, `evals` side by side above it,
each importing only `dlm` among the project's packages; `bench` and `gpu`, the tools, on top. Every import of every
module is read with `ast` (lazy imports inside functions included), so a new edge that goes up or sideways fails
here, naming the file and line."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FLOORS = {"dlm": 0, "app": 1, "train": 1, "evals": 1, "bench": 2, "gpu": 2}
# Edges allowed across one floor, each with its reason.
ALLOWED_SIDEWAYS = {
    ("gpu", "bench"): "the GPU runbook runs bench.continuation on the device and keeps its held-out books out of "
                      "training",
}
# Edges that still break the floors in files being edited elsewhere, each with the change that removes it: the test
# fails when one is gone, so the entry is removed with it.
PENDING: dict = {}
# A tab reaches the rest of the app through the facade only (plus the event helpers, the drawing, the shared widgets).
TAB_MAY_IMPORT = ("app.backend", "app.events", "app.render", "app.tabs")


def modules():
    for pkg in FLOORS:
        for path in sorted((REPO / pkg).rglob("*.py")):
            yield path
    yield REPO / "app.py"


def imports(path: Path):
    """(line, imported module) for every absolute import in `path`; relative imports stay inside the package."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            if node.module in FLOORS:  # `from app import api`: the submodules are the imports
                for alias in node.names:
                    yield node.lineno, f"{node.module}.{alias.name}"
            else:
                yield node.lineno, node.module


def package_of(path: Path) -> str:
    rel = path.relative_to(REPO)
    return "app" if rel == Path("app.py") else rel.parts[0]


def violations():
    found = {}
    for path in modules():
        here = package_of(path)
        rel = str(path.relative_to(REPO))
        for line, name in imports(path):
            there = name.split(".")[0]
            if there not in FLOORS or there == here:
                if rel.startswith("app/api") and name.startswith("app.tabs"):
                    found[(rel, name)] = f"{rel}:{line}: the API imports a tab ({name}); share through a non-tab module"
                elif rel.startswith("app/tabs/") and there == "app" and not name.startswith(TAB_MAY_IMPORT) \
                        and name not in ("app.MAX_NEW_TOKENS", "app.MAX_PROMPT_TOKENS", "app.TIME_LIMIT_S"):
                    found[(rel, name)] = f"{rel}:{line}: a tab imports {name}; go through app.backend"
                continue
            if FLOORS[there] < FLOORS[here] or (here, there) in ALLOWED_SIDEWAYS:
                continue
            way = "up" if FLOORS[there] > FLOORS[here] else "sideways"
            found[(rel, name)] = f"{rel}:{line}: {here} imports {name} ({way}: floor {FLOORS[here]} -> {FLOORS[there]})"
    return found


def test_imports_point_down_only():
    found = violations()
    unexpected = [msg for key, msg in found.items() if key not in PENDING]
    assert not unexpected, "imports that go up or sideways:\n" + "\n".join(unexpected)


@pytest.mark.parametrize("edge", sorted(PENDING))
def test_pending_edges_are_still_there(edge):
    """A pending exception that no longer exists is removed from PENDING (so it cannot come back silently)."""
    assert edge in violations(), f"{edge} is gone: remove it from PENDING ({PENDING[edge]})"


def test_the_checker_sees_lazy_and_package_imports(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("from app import api\n\ndef f():\n    from app.render import Trace\n    import evals.metrics\n")
    assert list(imports(bad)) == [(1, "app.api"), (4, "app.render"), (5, "evals.metrics")]
