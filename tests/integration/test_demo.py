"""`python -m vqfunc.demo --quick`: runs, prints the table, writes the PNG."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from vqfunc import demo

_ROW = re.compile(
    r"^(?P<name>\S.*?)\s+(?P<mse>\S+)\s+(?P<ratio>\S+)\s+(?P<ppl>\S+)\s+(?P<usage>\S+)%$"
)


@pytest.mark.slow
def test_quick_demo_prints_table_and_writes_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo.png"
    assert demo.main(["--quick", "--no-progress", "--out", str(out)]) == 0
    text = capsys.readouterr().out

    rows = {}
    for line in text.splitlines():
        match = _ROW.match(line)
        if match and match["name"] != "recipe":
            rows[match["name"].strip()] = match
    assert [name for name in rows] == [r.name for r in demo.RECIPES]
    num_codes = demo.Settings().num_codes
    for match in rows.values():
        mse, ppl, use = float(match["mse"]), float(match["ppl"]), float(match["usage"]) / 100
        assert math.isfinite(mse) and mse >= 0
        assert 1.0 <= ppl <= num_codes + 1e-6
        assert 0.0 < use <= 1.0
        # Perplexity can never exceed the number of codes used.
        assert ppl <= use * num_codes + 0.2  # both are rounded in the table
    assert float(rows["baseline"]["ratio"]) == 1.0

    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000


def test_bad_steps_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        demo.main(["--steps", "0"])
    assert "--steps" in capsys.readouterr().err


@pytest.mark.slow
def test_worker_processes_give_the_same_results() -> None:
    train_x, test_x = demo.load_data(0, 0.2)
    settings = demo.Settings(steps=2, warmup_batches=1)
    here = demo.run_all(train_x, test_x, settings, 0, jobs=1, threads=1, progress_bar=False)
    spawned = demo.run_all(train_x, test_x, settings, 0, jobs=2, threads=1, progress_bar=False)
    assert [r.name for r in spawned] == [r.name for r in here]
    for a, b in zip(here, spawned, strict=True):
        assert a.mse == b.mse, a.name
        assert a.histogram.equal(b.histogram), a.name


def test_missing_demo_extra_is_named_before_training(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = demo.importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "matplotlib" else real_find_spec(name, *args)

    monkeypatch.setattr(demo.importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(demo, "run_all", lambda *a, **k: pytest.fail("trained without the extra"))
    with pytest.raises(SystemExit, match=r"matplotlib.*pip install 'vqfunc\[demo\]'"):
        demo.main(["--quick"])
