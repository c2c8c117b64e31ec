"""`vqfunc.vqtorch` against records computed by vqtorch itself, step by step.

`tests/data/vqtorch_compat.pt.gz` (written by `tests/support/make_vqtorch_fixtures.py`) holds,
for every case of `support.vqtorch_cases`, what vqtorch did: the layer's initial `state_dict`
(made under the case's seed), the first step's output, `misc` and gradients, every step's codes
and commitment loss over 25 SGD steps (dead-code replacement drawing from the global
generator), the final `state_dict`s and an evaluation-mode pass. Each test reruns the case with
`vqfunc.vqtorch` and compares everything; `tests/data/vqtorch_parity.pt` (single forward passes,
see `test_parity.py`) is checked through the compatibility layers too.

vqtorch's k-means needs torchpq (CUDA only): its records were made with torchpq's `KMeans`
replaced by `stand_in_centroids`, and `kmeans_rule` puts the same rule into `vqfunc.vqtorch`.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from support import vqtorch_cases
from support.vqtorch_cases import CASES, Case

import vqfunc.vqtorch as vqtorch
import vqfunc.vqtorch.nn.utils.init as vqtorch_init

pytestmark = pytest.mark.filterwarnings("ignore:kmeans_init")

# Differences between vqtorch's cdist-based search and loss and vqfunc's fused kernels are
# rounding steps; after 25 training steps they stay below these.
RTOL, ATOL = 1e-4, 2e-5


@pytest.fixture(scope="module")
def records() -> dict[str, Any]:
    return vqtorch_cases.load_records()


@pytest.fixture
def kmeans_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """The k-means of the records (see the module docstring)."""
    monkeypatch.setattr(vqtorch_init, "_kmeans_centroids", vqtorch_cases.stand_in_centroids)


def assert_same(actual: Any, expected: Any, path: str = "") -> None:
    """Equal structure, shapes and dtypes; integers exactly, floats within RTOL / ATOL."""
    if isinstance(expected, dict):
        assert list(actual) == list(expected), f"{path}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_same(actual[key], expected[key], f"{path}/{key}")
        return
    if isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), path
        for i, (a, b) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, b, f"{path}[{i}]")
        return
    if not isinstance(expected, torch.Tensor):
        assert actual == expected, path
        return
    assert isinstance(actual, torch.Tensor), path
    if path.endswith("misc/loss"):
        # vqtorch's grouped and residual layers return one loss per batch element; the
        # compatibility layer returns their mean (a scalar), which vqtorch code `.mean()`s.
        expected = expected.mean()
    assert actual.shape == expected.shape, f"{path}: {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{path}: {actual.dtype} != {expected.dtype}"
    if expected.dtype.is_floating_point:
        torch.testing.assert_close(
            actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{path}: {m}"
        )
    else:
        assert torch.equal(actual, expected), f"{path}: {(actual != expected).sum()} entries differ"


def test_records_cover_every_case(records: dict[str, Any]) -> None:
    assert set(records["cases"]) == set(CASES)
    assert records["meta"]["vqtorch_commit"] == "02e60a1"


@pytest.mark.parametrize("name", list(CASES))
def test_same_seed_same_initial_layer(name: str, records: dict[str, Any]) -> None:
    """vqtorch's layer made under a seed has the same tensors, keys and order here."""
    layer, encoder = vqtorch_cases.build(vqtorch, CASES[name])
    expected = records["cases"][name]["initial_state"]
    assert_same(dict(layer.state_dict()), expected)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert_same(dict(encoder.state_dict()), records["cases"][name]["initial_encoder"])


@pytest.mark.parametrize("name", list(CASES))
def test_vqtorch_state_dicts_load_strictly(name: str, records: dict[str, Any]) -> None:
    """A vqtorch checkpoint (the trained state) loads with strict=True and gives vqtorch's
    evaluation-mode output."""
    record = records["cases"][name]
    case: Case = CASES[name]
    layer, encoder = vqtorch_cases.build(vqtorch, case)
    layer.load_state_dict(record["final_state"], strict=True)
    encoder.load_state_dict(record["final_encoder"], strict=True)
    layer.eval()
    with torch.no_grad():
        x = vqtorch_cases._layout(encoder(record["inputs"][0]), case)
        z_q, misc = layer(x)
    assert_same({"z_q": z_q, "q": misc["q"], "d": misc["d"]}, record["eval"])


@pytest.mark.parametrize("name", list(CASES))
def test_training_matches_vqtorch_step_by_step(
    name: str, records: dict[str, Any], kmeans_rule: None
) -> None:
    expected = records["cases"][name]
    actual = vqtorch_cases.train(vqtorch, CASES[name])
    assert_same(actual, expected)


def test_norms_dists_entropy_pooling_and_affine_match_vqtorch(records: dict[str, Any]) -> None:
    assert_same(vqtorch_cases.functions(vqtorch), records["functions"])


# --- the single-forward records of test_parity.py, through the compatibility layers ----------

SINGLE_PASS = (
    "vq_beta0.95",
    "vq_beta0.6_sync1.5",
    "vq_affine3_dimlast",
    "vq_affine2_sync0.5_beta0.9",
    "group3_shared",
    "group3_separate",
    "residual3_shared",
    "residual3_separate",
)


@pytest.mark.parametrize("name", SINGLE_PASS)
def test_single_pass_records(name: str, parity_records: dict[str, dict[str, Any]]) -> None:
    """vqtorch's arguments, codebook layout and code convention, unchanged."""
    record = parity_records[name]
    layer = getattr(vqtorch.nn, record["layer"])(**record["config"])
    with torch.no_grad():
        layer.codebook.weight.copy_(record["codebook"])
    layer.train()
    x = record["x"].clone().requires_grad_(True)
    z_q, misc = layer(x)
    ((z_q * record["w"]).sum() + 3.0 * misc["loss"].mean()).backward()
    torch.testing.assert_close(z_q.detach(), record["z_q"], rtol=1e-6, atol=1e-6)
    assert torch.equal(misc["q"], record["codes"])
    torch.testing.assert_close(misc["loss"].detach(), record["loss"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad, record["x_grad"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        layer.codebook.weight.grad, record["codebook_grad"], rtol=1e-5, atol=1e-6
    )
    if "affine_scale_raw_grad" in record:
        torch.testing.assert_close(
            layer.affine_transform.scale.grad, record["affine_scale_raw_grad"], rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(
            layer.affine_transform.bias.grad, record["affine_bias_raw_grad"], rtol=1e-5, atol=1e-6
        )


# --- with vqtorch itself, where its checkout is beside the repository ----------------------

CHECKOUT = vqtorch_cases.vqtorch_checkout()


@pytest.mark.skipif(CHECKOUT is None, reason="vqtorch's checkout (../shared/vqtorch) is absent")
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", list(CASES))
def test_state_dicts_travel_both_ways_with_vqtorch(name: str, kmeans_rule: None) -> None:
    """A state saved here loads into vqtorch with strict=True, and vqtorch's loads here; the
    two layers then give the same evaluation-mode output."""
    assert CHECKOUT is not None
    real = vqtorch_cases.import_vqtorch(CHECKOUT)
    case = CASES[name]
    trained_here = vqtorch_cases.train(vqtorch, case, steps=3)
    trained_there = vqtorch_cases.train(real, case, steps=3)
    for state in (trained_here["final_state"], trained_there["final_state"]):
        ours, _ = vqtorch_cases.build(vqtorch, case)
        theirs, _ = vqtorch_cases.build(real, case)
        ours.load_state_dict(state, strict=True)
        theirs.load_state_dict(state, strict=True)
        ours.eval(), theirs.eval()
        x = vqtorch_cases._layout(torch.randn(3, 2, 2, case.args[0]), case)
        with torch.no_grad():
            z_q, misc = ours(x)
            z_q_real, misc_real = theirs(x)
        torch.testing.assert_close(z_q, z_q_real, rtol=1e-5, atol=1e-6)
        assert torch.equal(misc["q"], misc_real["q"])
