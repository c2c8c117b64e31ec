"""Every ```python block of README.md and of the pages in docs/ runs, as written.

Convention (also stated in README.md): the blocks of README.md run in order, top to bottom, in
one shared namespace, like cells of a notebook. A block may use names defined by an earlier
block, never by a later one. Each page of docs/ runs the same way in a namespace of its own, so
a page's blocks import what they use. They run from an empty temporary working directory.

The README's relative links (to the docs pages, the notebooks) point at files that exist, and
the docs' home page shows the README's two commands as they are.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
COMMAND_MARKERS = ("<!-- demo-command -->", "<!-- test-command -->")

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def code_blocks(text: str, language: str) -> list[tuple[int, str]]:
    """`(first line number, source)` of every fenced block in `language`, in order."""
    blocks = []
    for match in _FENCE.finditer(text):
        if match.group(1) == language:
            line = text.count("\n", 0, match.start(2)) + 1
            blocks.append((line, match.group(2)))
    return blocks


def test_code_blocks_finds_fences() -> None:
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = x\n```\n"
    assert code_blocks(text, "python") == [(3, "x = 1\n"), (9, "y = x\n")]
    assert code_blocks(text, "bash") == [(6, "ls\n")]


def test_readme_has_the_two_commands() -> None:
    text = README.read_text()
    for marker in COMMAND_MARKERS:
        assert marker in text, f"README.md lost the {marker} marker"
        after = text.split(marker, 1)[1].lstrip("\n")
        assert after.startswith("```bash\n"), f"{marker} must be followed by a ```bash block"


def run_blocks(path: Path, blocks: list[tuple[int, str]]) -> None:
    """Run `blocks` of `path` in order in one fresh namespace; fail on the first that raises."""
    name = path.relative_to(ROOT)
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for line, source in blocks:
        code = compile("\n" * (line - 1) + source, str(path), "exec")
        try:
            exec(code, namespace)
        except Exception as error:
            pytest.fail(f"{name} block at line {line} raised {type(error).__name__}: {error}")


def test_readme_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = code_blocks(README.read_text(), "python")
    assert blocks, "README.md holds no ```python block"
    monkeypatch.chdir(tmp_path)
    run_blocks(README, blocks)


DOC_PAGES = sorted(DOCS.rglob("*.md"))
PAGES_WITH_CODE = [page for page in DOC_PAGES if code_blocks(page.read_text(), "python")]


def test_docs_pages_with_python_blocks_found() -> None:
    # The checkpoint example moved from README.md to the page on processes and checkpoints.
    assert DOCS / "scaling.md" in PAGES_WITH_CODE


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda page: page.name)
def test_docs_python_blocks_run(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    run_blocks(page, code_blocks(page.read_text(), "python"))


def command_after(text: str, marker: str) -> str:
    """The fenced block that directly follows `marker`, fences included."""
    after = text.split(marker, 1)[1].lstrip("\n")
    return after[: after.index("\n```", 3) + len("\n```")]


def test_docs_home_shows_the_readme_commands() -> None:
    readme, home = README.read_text(), (DOCS / "index.md").read_text()
    for marker in COMMAND_MARKERS:
        assert marker in home, f"docs/index.md lost the {marker} marker"
        assert command_after(home, marker) == command_after(readme, marker), (
            f"the command after {marker} differs between docs/index.md and README.md"
        )


_LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_readme_links_resolve() -> None:
    links = _LINK.findall(README.read_text())
    local = [link.split("#", 1)[0] for link in links if "://" not in link]
    assert any(link.startswith("docs/") for link in local), "README.md links to no docs page"
    missing = [link for link in local if link and not (ROOT / link).exists()]
    assert not missing, f"README.md links to missing files: {missing}"
