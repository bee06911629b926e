"""Every Python example of the README's "Python API" section runs as written."""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import pytest

from indexer.synthetic import scene
from tests.helpers import BUILD_FLAGS, run_cli

README = Path(__file__).resolve().parents[1] / "README.md"


def python_api_examples() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("### Python API", 1)[1]
    section = re.split(r"\n##+ ", section, maxsplit=1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readme_has_python_examples() -> None:
    assert len(python_api_examples()) >= 2


@pytest.mark.parametrize("number", range(len(python_api_examples())))
def test_readme_python_example_runs(
    number: int, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = _photos(tmp_path_factory)
    monkeypatch.chdir(work)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # set_search_params on a flat index warns, as documented
        exec(compile(python_api_examples()[number], f"README example {number}", "exec"), {})


def _photos(factory: pytest.TempPathFactory) -> Path:
    """photos.idx built from 30 images (holidays/IMG_0042.jpg among them), a.jpg and b.png."""
    work = factory.getbasetemp() / "readme-work"
    if (work / "photos.idx").is_dir():
        return work
    src = work / "photos"
    (src / "holidays").mkdir(parents=True)
    for i in range(30):
        folder = src / ("home" if i % 2 else "holidays")
        folder.mkdir(exist_ok=True)
        scene(i, (120, 90)).save(folder / f"IMG_{i + 28:04d}.jpg")
    shutil.copy(src / "home" / "IMG_0029.jpg", work / "a.jpg")
    scene(99, (100, 100)).save(work / "b.png")
    result = run_cli("build", src, "--out", work / "photos.idx", *BUILD_FLAGS)
    assert result.exit_code == 0, result.output
    return work
