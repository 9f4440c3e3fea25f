"""Imports run downward only: every module of pac/ and launcher/ imports from its own layer or lower ones
(the table is pac.layers.LAYERS). Imports inside functions count too: a late import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

from pac.layers import LAYER_NAMES, LAYER_ONE_DOWNWARD, LAYERS, layer_of

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pac", "launcher")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str) -> set[str]:
    """Modules `path` imports (absolute names, relative imports resolved), at module level or in functions.
    `from a import b` counts as an import of a.b when that is a module of the project, else of a."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            found.update(
                f"{source}.{alias.name}" if _is_module(f"{source}.{alias.name}") else source for alias in node.names
            )
    return {name for name in found if name.split(".")[0] in PACKAGES}


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _package_of(module: str) -> str:
    """The layer-1 package of a module (pac.cache.reader -> pac.cache)."""
    return ".".join(module.split(".")[:2])


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def test_every_module_has_a_layer():
    unplaced = [name for name in _modules() if layer_of(name) is None]
    assert not unplaced, f"add these modules to LAYERS in pac/layers.py (prefix -> layer): {unplaced}"


def test_imports_run_downward():
    upward = []
    for importer, path in _modules().items():
        a = layer_of(importer)
        for imported in sorted(_imports(path, importer)):
            b = layer_of(imported)
            if a is None or b is None:
                continue  # test_every_module_has_a_layer names it
            sideways = a == b == 1 and _package_of(importer) != _package_of(imported)
            if b > a or (sideways and (_package_of(importer), _package_of(imported)) not in LAYER_ONE_DOWNWARD):
                upward.append(f"{importer} -> {imported} (layer {a} -> layer {b})")
    layers = "; ".join(f"{n}: {what}" for n, what in LAYER_NAMES.items())
    assert not upward, f"imports that run upward or across layer 1 ({layers}):\n" + "\n".join(upward)


def test_the_table_names_only_layers_it_describes():
    assert set(LAYERS.values()) <= set(LAYER_NAMES)
