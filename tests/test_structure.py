"""The package-shape check of `make lint` (.ci/structure.py) on small generated packages."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def structure() -> ModuleType:
    spec = importlib.util.spec_from_file_location("structure", REPO / ".ci" / "structure.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["structure"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def package(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    return pkg


def test_a_deferred_import_closing_a_loop_is_a_cycle(structure: ModuleType, tmp_path: Path) -> None:
    pkg = package(tmp_path, {
        "a.py": "from pkg import b\n",
        "b.py": "def f():\n    from pkg.a import x\n",
    })  # fmt: skip
    assert structure.problems(pkg) == ["import cycle: pkg.a -> pkg.b"]


def test_type_checking_imports_are_not_cycles(structure: ModuleType, tmp_path: Path) -> None:
    pkg = package(tmp_path, {
        "a.py": "from pkg import b\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import x\n",
    })  # fmt: skip
    assert structure.problems(pkg) == []


def test_relative_imports_count(structure: ModuleType, tmp_path: Path) -> None:
    pkg = package(
        tmp_path,
        {
            "a.py": "from . import b\n",
            "sub/__init__.py": "",
            "sub/c.py": "from ..a import x\n",
            "b.py": "from .sub import c\n",
        },
    )
    assert structure.problems(pkg) == [
        "import cycle: pkg.a -> pkg.b -> pkg.sub.c",
        "import cycle at import time: pkg.a -> pkg.b -> pkg.sub.c",
    ]


@pytest.mark.parametrize(("depth", "broken"), [(10, False), (11, True)])
def test_import_chains_are_at_most_ten_modules(
    structure: ModuleType, tmp_path: Path, depth: int, broken: bool
) -> None:
    files = {f"m{i}.py": f"import pkg.m{i + 1}\n" for i in range(depth - 1)}
    files[f"m{depth - 1}.py"] = ""
    found = structure.problems(package(tmp_path, files))
    assert bool(found) is broken, found
    if broken:
        assert found[0].startswith("import chain of 11 modules (at most 10): pkg.m0 -> pkg.m1")


def test_deferred_imports_are_not_import_time_chains(structure: ModuleType, tmp_path: Path) -> None:
    files = {f"m{i}.py": f"def f():\n    import pkg.m{i + 1}\n" for i in range(14)}
    files["m14.py"] = ""
    assert structure.problems(package(tmp_path, files)) == []


def test_long_modules_and_functions(structure: ModuleType, tmp_path: Path) -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(80))  # 81 lines with the def
    pkg = package(tmp_path, {"long.py": "\n" * 601, "fn.py": f"@staticmethod\ndef f():\n{body}"})
    found = structure.problems(pkg)
    assert f"{pkg / 'long.py'}: 601 lines (at most 600)" in found
    assert f"{pkg / 'fn.py'}:1: function f is 82 lines (at most 80)" in found
    assert len(found) == 2


def test_the_package_has_the_shape_make_lint_checks(structure: ModuleType) -> None:
    assert structure.problems(REPO / "indexer") == []
