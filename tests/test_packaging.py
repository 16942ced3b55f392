"""What is imported and what is installed: the tests run this checkout's code, a source checkout
exposes kernels/ (and nothing else of the repository) as lad_triton.kernels, and a regular
install of the wheel holds lad_triton.kernels and no top-level `kernels` package (that import
name belongs to another PyPI project)."""

import importlib
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_tests_import_this_checkout():
    # An installed copy (pip install without -e) must not be what the tests exercise: an edited
    # source would go untested without a word.
    import lad_triton
    import lad_triton.kernels
    import lad_triton.kernels.config

    assert Path(lad_triton.__file__).resolve() == ROOT / "lad_triton" / "__init__.py"
    assert Path(lad_triton.kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"
    assert Path(lad_triton.kernels.config.__file__).resolve() == ROOT / "kernels" / "config.py"


@pytest.mark.parametrize("name", ["bench", "examples", "tests", "pyproject"])
def test_only_kernels_of_the_repository_is_under_lad_triton(name):
    with pytest.raises(ImportError):
        importlib.import_module(f"lad_triton.{name}")


def test_import_lad_triton_imports_neither_triton_nor_the_kernels():
    # The PyTorch path (and the benchmark's traffic model) work on machines without Triton.
    probe = ("import sys; sys.modules['triton'] = None; import lad_triton, torch; "
             "import lad_triton.kernels.config; "
             "x = torch.randn(1, 3, 4, 4, requires_grad=True); "
             "lad_triton.locally_adaptive_loss(x, torch.zeros(1, 4, 4, dtype=torch.long)).backward(); "
             "print(sorted(m for m in sys.modules if m.startswith('lad_triton.kernels')))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == "['lad_triton.kernels', 'lad_triton.kernels.config']"


def test_wheel_installs_kernels_as_lad_triton_kernels(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
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
    assert "lad_triton/integrations/mmseg.py" in names
    assert not [n for n in names if n.startswith("kernels/")]
    assert [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]  # the MIT text

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


def test_what_a_published_package_carries():
    # The license pyproject declares, a citation and a changelog for the version it declares,
    # and the version said in the README, all in agreement.
    import lad_triton

    pyproject = (ROOT / "pyproject.toml").read_text()  # tomllib is Python 3.11+
    version = re.search(r'^version = "(.+)"$', pyproject, re.M).group(1)
    assert re.search(r'^license = "MIT"$', pyproject, re.M)
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License\n\nCopyright (c) 2026 the lad_triton authors\n")
    assert "THE SOFTWARE IS PROVIDED \"AS IS\"" in license_text
    citation = (ROOT / "CITATION.cff").read_text()
    assert f"\nversion: {version}\n" in citation and "\nlicense: MIT\n" in citation
    assert "title: Locally Adaptive Learning Loss for Semantic Image Segmentation" in citation
    assert f"\n## {version} " in (ROOT / "CHANGELOG.md").read_text()
    readme = (ROOT / "README.md").read_text()
    assert f"Version {version} ([CHANGELOG.md](CHANGELOG.md))" in readme
    assert lad_triton.__version__ == version
    # what the package is for comes before how it is benchmarked
    assert readme.index("\n## Use\n") < readme.index("<!-- ci:main -->")
