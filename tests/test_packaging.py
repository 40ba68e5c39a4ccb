"""The distribution installs under the superdiff namespace only (design.md, Layout)."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _packages_on_disk():
    mapping = {"superdiff": "superdiff", "pipelines": "superdiff.pipelines", "ui": "superdiff.ui", "protein": "superdiff.protein"}
    found = set()
    for top, name in mapping.items():
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    return found


def test_every_package_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert _packages_on_disk() <= set(cfg["packages"]), _packages_on_disk() - set(cfg["packages"])
    assert not any(p.split(".")[0] in ("pipelines", "ui", "protein") for p in cfg["packages"])


_CHECK = (
    "import importlib.util, sys, superdiff, superdiff.pipelines, superdiff.ui, superdiff.protein\n"
    "bad = [n for n in ('pipelines', 'ui', 'protein') if importlib.util.find_spec(n) is not None]\n"
    "print(superdiff.__file__); print(superdiff.pipelines.__file__); print('BAD', bad)\n"
)


def test_editable_install_imports_from_the_repo(tmp_path):
    r = subprocess.run([sys.executable, "-c", _CHECK], cwd=tmp_path, capture_output=True, text=True, check=True)
    lines = r.stdout.splitlines()
    assert lines[1] == str(ROOT / "pipelines" / "__init__.py")
    assert lines[2] == "BAD []"


def test_regular_wheel_install_imports_under_the_namespace(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("superdiff-*.whl"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    assert not (site / "pipelines").exists() and not (site / "ui").exists() and not (site / "protein").exists()
    code = f"import sys; sys.path.insert(0, {str(site)!r}); " + _CHECK.replace("\n", "; ").rstrip("; ")
    code = re.sub(r";\s*;", ";", code)
    r = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(str(site)) and lines[1].startswith(str(site)) and lines[2] == "BAD []"
