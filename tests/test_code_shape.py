"""One screen per idea: no file over 500 lines and no function over 60 in the library, the app, training and
evaluation (measured with `ast`, docstrings included). A long one is split where its ideas part; the failure names
each offender."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("dlm", "app", "train", "evals")
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60


def sources():
    for pkg in PACKAGES:
        yield from sorted((REPO / pkg).rglob("*.py"))


def long_functions(path: Path):
    """(qualified name, first line, length) of every function in `path` longer than MAX_FUNCTION_LINES."""
    def walk(node, prefix: str):
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                yield from walk(child, prefix)
                continue
            name = prefix + child.name
            if not isinstance(child, ast.ClassDef) and child.end_lineno - child.lineno + 1 > MAX_FUNCTION_LINES:
                yield name, child.lineno, child.end_lineno - child.lineno + 1
            yield from walk(child, name + ".")
    yield from walk(ast.parse(path.read_text(encoding="utf-8"), str(path)), "")


def test_no_file_is_over_500_lines():
    long = [f"{p.relative_to(REPO)}: {n} lines" for p in sources()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES]
    assert not long, f"files over {MAX_FILE_LINES} lines (split them where their ideas part):\n" + "\n".join(long)


def test_no_function_is_over_60_lines():
    long = [f"{p.relative_to(REPO)}:{line}: {name} is {n} lines" for p in sources()
            for name, line, n in long_functions(p)]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_the_measure_sees_nested_functions_and_methods(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    src = tmp_path / "x.py"
    src.write_text(f"class A:\n    def short(self):\n        def inner():\n{body.replace('    ', '            ')}\n"
                   f"        return inner\n\ndef f():\n{body}\n")
    assert [(name, n) for name, _, n in long_functions(src)] == [("A.short", MAX_FUNCTION_LINES + 3),
                                                                 ("A.short.inner", MAX_FUNCTION_LINES + 1),
                                                                 ("f", MAX_FUNCTION_LINES + 1)]
