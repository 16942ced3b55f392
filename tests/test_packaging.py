"""A regular (non-editable) install of the wheel holds lad_triton.kernels and no top-level
`kernels` package (that import name belongs to another PyPI project)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_kernels_as_lad_triton_kernels(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("lad_triton", "kernels"):
        shutil.copytree(ROOT / name, source / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheels), str(source)], check=True)
    (wheel,) = wheels.glob("lad_triton-*.whl")

    names = zipfile.ZipFile(wheel).namelist()
    assert "lad_triton/kernels/__init__.py" in names
    assert "lad_triton/unfused.py" in names
    assert not [n for n in names if n.startswith("kernels/")]

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True)
    assert not (site / "kernels").exists()
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import lad_triton.kernels as k, "
             "lad_triton as p; print(k.__file__); print(p.locally_adaptive_loss.__module__)")
    out = subprocess.run([sys.executable, "-c", probe, str(site)], cwd=tmp_path, check=True,
                         capture_output=True, text=True).stdout.split()
    assert Path(out[0]).resolve() == (site / "lad_triton" / "kernels" / "__init__.py").resolve()
    assert out[1] == "lad_triton.functional"
