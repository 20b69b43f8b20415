"""The package's import graph, parsed with ``ast``: the shared floor does not reach up into a wing,
and the features and train wings do not import each other (they meet at ``checkpoint.py``)."""

from __future__ import annotations

import ast
from pathlib import Path

import rose_select

PACKAGE = Path(rose_select.__file__).parent
WINGS = ("data", "features", "select", "train")
# modules every wing and stage may use; none of them may import a wing
SHARED = ("errors", "io", "config", "runtime", "modeling", "records", "tokenization", "losses", "tables",
          "plots", "compat", "checkpoint", "distributed", "stats", "testing")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every ``rose_select`` module ``path`` imports (``from rose_select.x import y`` counts ``x``
    and, when ``y`` is a module, ``x.y``), anywhere in the file (function bodies included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("rose_select")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rose_select"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if _exists(m)}


def _exists(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def wing_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in WINGS else None


def test_the_graph_is_read():  # the test below would pass on an empty graph
    g = graph()
    assert "rose_select.features.stage" in g["rose_select.pipeline"]
    assert "rose_select.checkpoint" in g["rose_select.features.gradients"]
    assert wing_of("rose_select.features.stage") == "features" and wing_of("rose_select.checkpoint") is None
    assert all(f"rose_select.{s}" in g for s in SHARED)  # no misspelt name escapes the check


def test_no_shared_module_imports_a_wing():
    g = graph()
    bad = {m: sorted(i for i in g[m] if wing_of(i)) for m in (f"rose_select.{s}" for s in SHARED)}
    assert {m: v for m, v in bad.items() if v} == {}


def test_features_and_train_wings_do_not_import_each_other():
    g = graph()
    crossing = sorted((m, i) for m, deps in g.items() for i in deps
                      if {wing_of(m), wing_of(i)} == {"features", "train"})
    assert crossing == []


def test_the_data_wing_shares_no_private_names():
    """The data wing's modules meet at a public interface (what the loaders need from ``reading``
    and ``rawtext``), so a newcomer sees what is meant to be used."""
    shared = sorted((module_name(p), a.name) for p in (PACKAGE / "data").glob("*.py")
                    for node in ast.walk(ast.parse(p.read_text())) if isinstance(node, ast.ImportFrom)
                    and (node.module or "").startswith("rose_select.data") for a in node.names if a.name.startswith("_"))
    assert shared == []
