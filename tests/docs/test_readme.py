"""Every ```python block of README.md runs, as written.

Convention (also stated in README.md): the blocks run in order, top to bottom, in one shared
namespace, like cells of a notebook. A block may use names defined by an earlier block, never
by a later one. They run from an empty temporary working directory.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"

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
    for marker in ("<!-- demo-command -->", "<!-- test-command -->"):
        assert marker in text, f"README.md lost the {marker} marker"
        after = text.split(marker, 1)[1].lstrip("\n")
        assert after.startswith("```bash\n"), f"{marker} must be followed by a ```bash block"


def test_readme_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = code_blocks(README.read_text(), "python")
    assert blocks, "README.md holds no ```python block"
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for line, source in blocks:
        code = compile("\n" * (line - 1) + source, str(README), "exec")
        try:
            exec(code, namespace)
        except Exception as error:
            pytest.fail(f"README.md block at line {line} raised {type(error).__name__}: {error}")
