"""The README works as written: its python blocks run, and it links only to files in the repository."""

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_block_runs(i, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a block writes lands here
    exec(compile(BLOCKS[i], f"README.md python block {i + 1}", "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("doc", ["README.md", "docs/DESIGN.md"])
def test_links_stay_inside_the_repository_and_exist(doc):
    text = (ROOT / doc).read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)", text)
    for target in targets:
        assert "://" not in target, f"{doc} links outside the repository: {target}"
        path = (ROOT / doc).parent / target
        assert path.resolve().is_relative_to(ROOT) and path.exists(), f"{doc}: {target}"
    assert "../" not in text and "shared/DESIGN" not in text
    if doc == "README.md":
        assert "docs/DESIGN.md" in targets
