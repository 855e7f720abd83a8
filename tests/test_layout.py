"""The layout rules of the tree, checked: the float64 oracle is only an oracle, the apps sit
apart from the library, the kernels are Triton only; and the NaN-poisoning fixture reaches
every allocation it is meant to."""
from __future__ import annotations

import ast
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "performer_triton"


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules `path` imports (relative imports resolved)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "kernels":  # installed as performer_triton.kernels
        parts = ["performer_triton", *parts]
    package = parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _modules(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def _core() -> list[Path]:
    apps = ("cli", "__main__.py")
    return [
        p
        for p in _modules(PACKAGE)
        if not set(apps) & set(p.relative_to(PACKAGE).parts) and p.name != "reference.py"
    ]


def test_layout_scan_sees_the_tree():
    core = {p.name for p in _core()}
    assert {"functional.py", "feature_maps.py", "torch_backend.py", "performer_pytorch.py", "decoding.py"} <= core
    # the scanner resolves both spellings of an import of the oracle
    assert "performer_triton.reference" in _imports(ROOT / "tests" / "kernel_cases.py")
    assert "performer_triton.reference" in _imports(PACKAGE / "cli" / "check.py")


def test_production_code_never_imports_the_oracle():
    offenders = {
        str(p.relative_to(ROOT)): sorted(n for n in _imports(p) if n.startswith("performer_triton.reference"))
        for p in _core() + _modules(ROOT / "kernels")
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_core_never_imports_the_apps():
    offenders = {
        str(p.relative_to(ROOT)): sorted(n for n in _imports(p) if n.startswith("performer_triton.cli"))
        for p in _core() + _modules(ROOT / "kernels")
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_kernels_import_only_triton_torch_and_themselves():
    allowed = ("triton", "torch", "performer_triton.kernels", "__future__")
    for path in _modules(ROOT / "kernels"):
        stray = sorted(n for n in _imports(path) if not n.startswith(allowed))
        assert stray == [], path.name


def test_nan_fixture_poisons_every_allocation():
    x = torch.zeros(2, 3)
    allocations = (
        torch.empty(2),
        torch.empty_like(x),
        torch.empty_strided((2, 2), (2, 1)),
        x.new_empty(3),
        x.new_empty_strided((2, 2), (2, 1)),
    )
    for t in allocations:
        assert torch.isnan(t).all()
    assert not torch.isnan(torch.zeros(2)).any() and not torch.isnan(x.new_zeros(2)).any()
