"""The package's layers, read from the source: each module imports only what is below it.

    kernels/                 Triton kernels and launch helpers: nothing of lad_triton
    options                  the options value, the accumulation dtype
    validation, reduction,   the contract's checks and reductions, the PyTorch implementation:
    pooling, unfused         nothing of kernels/, fused or dispatch
    fused, dispatch          the fused backend and the choice of backend
    functional, module, ...  the API; integrations/ on top, through public names only

No module imports a private name of another, the package root (a cycle through __init__), or
bench/, tests/ or examples/."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOWER = {"options", "validation", "reduction", "pooling", "unfused"}
FUSED = {"kernels", "fused", "dispatch"}


def imported(path, package):
    """(module imported, names taken from it) for every import of ``path``, relative imports
    resolved against ``package`` (the dotted name of the folder that holds it)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] \
                if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out.append((module, [alias.name for alias in node.names]))
    return out


def modules():
    """(dotted name, path) of every module of the package, kernels/ as lad_triton.kernels."""
    for path in sorted((ROOT / "lad_triton").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        yield ".".join(p for p in parts if p != "__init__"), path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        yield "lad_triton.kernels" + ("" if path.stem == "__init__" else f".{path.stem}"), path


def violations(name, path):
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    own = name.split(".")[1] if name.count(".") else ""
    found = []
    for module, names in imported(path, package):
        parts = module.split(".")
        if parts[0] in ("bench", "tests", "examples", "kernels"):
            found.append(f"imports {module} (not part of the package, or kernels/ by its "
                         "folder's name)")
        if parts[0] != "lad_triton":
            continue
        target = parts[1] if len(parts) > 1 else ""
        taken = [n for n in names if n.startswith("_")]
        if taken:
            found.append(f"takes private names {taken} of {module}")
        if not target and path.name != "__init__.py" or (not target and names and own):
            submodules = {p.stem for p in (ROOT / "lad_triton").iterdir()} | {"kernels"}
            if any(n not in submodules for n in names) or not names:
                found.append(f"imports the package root ({module}: {names})")
        if own == "kernels" and target != "kernels":
            found.append(f"kernels/ imports {module}")
        if own in LOWER and (target in FUSED or
                             any(n in FUSED for n in names if not target)):
            found.append(f"{own} (below the fused backend) imports {module} {names}")
    return found


@pytest.mark.parametrize("name,path", list(modules()), ids=lambda v: str(v)[-40:])
def test_each_module_imports_only_what_is_below_it(name, path):
    assert not violations(name, path), f"{path.relative_to(ROOT)}: {violations(name, path)}"


@pytest.mark.parametrize("source,module,expected", [
    ("from .kernels.config import accumulation_dtype\n", "unfused", "below the fused backend"),
    ("from .fused import costs\n", "validation", "below the fused backend"),
    ("from . import dispatch\n", "reduction", "below the fused backend"),
    ("from .validation import _finite\n", "functional", "private names"),
    ("from lad_triton.reduction import valid_centres\n", "kernels/forward", "kernels/ imports"),
    ("import lad_triton\n", "dispatch", "package root"),
    ("from bench import workloads\n", "functional", "not part of the package"),
    ("import kernels.config\n", "functional", "kernels/ by its folder"),
])
def test_the_scan_sees_a_forbidden_import(tmp_path, source, module, expected):
    folder, _, stem = module.rpartition("/")
    name = ("lad_triton.kernels." if folder else "lad_triton.") + stem
    path = tmp_path / f"{stem}.py"
    path.write_text(source)
    assert any(expected in v for v in violations(name, path)), violations(name, path)


def test_the_scan_passes_an_allowed_import(tmp_path):
    path = tmp_path / "functional.py"
    path.write_text("from .fused import fused_mean\nfrom .options import CostOptions\n")
    assert violations("lad_triton.functional", path) == []
