"""vqtorch's example scripts and README snippet, run with `vqfunc.vqtorch`, against vqtorch.

The sources come from vqtorch's checkout beside the repository (`../shared/vqtorch`; the
tests skip without it) and are adapted by `support.vqtorch_examples` exactly as they were for
the records in `tests/data/vqtorch_compat.pt.gz`: the import names `vqfunc.vqtorch`, no
`.cuda()`, scikit-learn's digits instead of MNIST, 25 training steps, the printed numbers
with nine significant digits, float64 as the default dtype (so that both searches pick the
true nearest code: in float32 their roundings differ, and one near-tie decided differently
sends two AdamW trainings apart). The records were made by vqtorch with torchpq's k-means
replaced by `stand_in_centroids`; the comparisons put the same rule into `vqfunc.vqtorch`, and
`test_*_with_vqfunc_kmeans` run the scripts with vqfunc's own k-means. The float32 path is
compared step by step in `test_vqtorch_parity.py`.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from support import vqtorch_cases, vqtorch_examples

import vqfunc.vqtorch.nn.utils.init as vqtorch_init

pytestmark = pytest.mark.filterwarnings("ignore:kmeans_init")

CHECKOUT = vqtorch_cases.vqtorch_checkout()
needs_checkout = pytest.mark.skipif(
    CHECKOUT is None, reason="vqtorch's checkout is not beside the repository (../shared/vqtorch)"
)
RTOL = 1e-7


@pytest.fixture(scope="module")
def records() -> dict[str, Any]:
    return vqtorch_cases.load_records()


@pytest.fixture(scope="module")
def digits() -> torch.utils.data.TensorDataset:
    return vqtorch_examples.digits()


@pytest.fixture
def kmeans_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vqtorch_init, "_kmeans_centroids", vqtorch_cases.stand_in_centroids)


def adapted(name: str) -> str:
    assert CHECKOUT is not None
    source = vqtorch_examples.example_path(CHECKOUT, name).read_text()
    return vqtorch_examples.adapt(source, "vqfunc.vqtorch")


def readme() -> tuple[str, list[str]]:
    assert CHECKOUT is not None
    code, outputs = vqtorch_examples.readme_snippet((CHECKOUT / "README.md").read_text())
    return vqtorch_examples.adapt(code, "vqfunc.vqtorch"), outputs


def assert_digest(actual: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    assert list(actual) == list(expected), f"{where}: {list(actual)} != {list(expected)}"
    for key, want in expected.items():
        got = actual[key]
        if key == "loss" and where.endswith("misc") and want["shape"] != ():
            # vqtorch's grouped and residual loss is per batch element; here it is the mean.
            count = math.prod(want["shape"])
            assert got["shape"] == (), where
            assert math.isclose(got["sum"], want["sum"] / count, rel_tol=RTOL), where
            continue
        assert got["shape"] == want["shape"] and got["dtype"] == want["dtype"], (where, key)
        for stat in ("sum", "sum_sq"):
            assert math.isclose(got[stat], want[stat], rel_tol=RTOL, abs_tol=1e-4), (
                f"{where}/{key}: {stat} {got[stat]} != {want[stat]}"
            )
        if "values" in want:
            torch.testing.assert_close(got["values"], want["values"], rtol=RTOL, atol=1e-5)


def assert_same_run(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    """Same printed lines (memory addresses aside), step numbers, digests."""

    def lines(record: dict[str, Any]) -> list[str]:
        return [line for line in record["printed"] if " at 0x" not in line and ">>>" not in line]

    assert lines(actual) == lines(expected)
    assert len(actual["runs"]) == len(expected["runs"])
    for i, (got, want) in enumerate(zip(actual["runs"], expected["runs"], strict=True)):
        assert len(got["steps"]) == len(want["steps"]) == vqtorch_examples.STEPS
        for step, (a, b) in enumerate(zip(got["steps"], want["steps"], strict=True)):
            assert a == pytest.approx(b, rel=RTOL, abs=1e-6), f"run {i} step {step}: {a} != {b}"
        assert_digest(got["model"], want["model"], f"run {i} model")
    assert len(actual["snapshots"]) == len(expected["snapshots"])
    for i, (got, want) in enumerate(zip(actual["snapshots"], expected["snapshots"], strict=True)):
        assert got["error"] == pytest.approx(want["error"], rel=RTOL)
        assert got["misc_keys"] == want["misc_keys"]
        for part in ("layer", "z_q", "misc"):
            assert_digest(got[part], want[part], f"snapshot {i} {part}")
    assert (actual["final"] is None) == (expected["final"] is None)
    if expected["final"] is not None:
        assert actual["final"]["misc_keys"] == expected["final"]["misc_keys"]
        for part in ("layer", "z_q", "misc"):
            assert_digest(actual["final"][part], expected["final"][part], f"final {part}")


@pytest.mark.slow
@needs_checkout
@pytest.mark.parametrize("name", vqtorch_examples.EXAMPLES)
def test_example_matches_vqtorch(
    name: str, records: dict[str, Any], digits: Any, kmeans_rule: None
) -> None:
    actual = vqtorch_examples.run(adapted(name), dataset=digits)
    assert_same_run(actual, records["examples"][name])


@needs_checkout
def test_readme_matches_vqtorch(records: dict[str, Any], kmeans_rule: None) -> None:
    code, outputs = readme()
    actual = vqtorch_examples.run(code)
    assert_same_run(actual, records["readme"])
    assert outputs == records["readme"]["outputs"]
    # The README's `>>> dict_keys([...])` line: the keys of `misc`, in order.
    assert outputs == [f"dict_keys({actual['final']['misc_keys']})"]


@needs_checkout
@pytest.mark.slow
def test_readme_with_vqfunc_kmeans() -> None:
    """The README as written, with vqfunc's k-means on the CPU (vqtorch needs CUDA for it)."""
    code, _ = readme()
    actual = vqtorch_examples.run(code)
    final = actual["final"]
    assert final["layer"]["data_initialized"]["values"].tolist() == [1.0]
    assert final["misc_keys"] == ["z", "z_q", "d", "q", "loss", "perplexity"]
    assert math.isfinite(final["misc"]["loss"]["sum"])


@needs_checkout
@pytest.mark.slow
@pytest.mark.parametrize("name", vqtorch_examples.EXAMPLES)
def test_example_with_vqfunc_kmeans(name: str, digits: Any) -> None:
    actual = vqtorch_examples.run(adapted(name), dataset=digits)
    for run in actual["runs"]:
        assert all(math.isfinite(v) for step in run["steps"] for v in step)
    for snapshot in actual["snapshots"]:
        assert 0 < snapshot["error"][0] < 2
