"""The library's boundary: nothing under distill/ imports the recipes (pipelines/) or the server (serve/), not even
for type checking; the recipes and the server build on the library, never the other way round."""

from __future__ import annotations

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "distill"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_library_imports_neither_the_recipes_nor_the_server():
    files = sorted(LIBRARY.rglob("*.py"))
    assert len(files) > 20  # the scan sees the library (its stage packages included)
    offending = {str(f.relative_to(LIBRARY.parent)): sorted(m for m in imported_modules(f)
                                                             if m.split(".")[0] in {"pipelines", "serve"})
                 for f in files}
    assert {f: m for f, m in offending.items() if m} == {}


def test_the_scan_finds_an_import_of_a_recipe(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipelines.train import TrainConfig\n"
                      "def f():\n    import serve.app\n")
    assert {"pipelines.train", "serve.app"} <= imported_modules(module)
