"""Numerical parity with vqtorch on its plain and grouped layers.

`tests/data/vqtorch_parity.pt` maps a case name to a record computed by vqtorch itself: the
layer (`VectorQuant` or `GroupVectorQuant`) is built from `config`, its codebook set to
`codebook`, and run in training mode on `x`; the objective
`(z_q * w).sum() + 3.0 * misc["loss"].mean()` is back-propagated. A record holds `x`, `w`,
`codebook`, the outputs `z_q`, `codes`, `loss`, and the gradients `x_grad`, `codebook_grad`
and, with `affine_lr > 0`, `affine_scale_raw_grad` / `affine_bias_raw_grad` of the raw affine
parameters (both zero). Residual records are checked in the residual tests.

Index conventions that differ (both documented in vqfunc's `QuantizeOutput`):
- vqtorch's plain layer returns codes with a trailing axis of size 1; vqfunc returns codes with
  the input's shape minus the feature axis, and adds a group axis only when `groups > 1`.
- With `share=False` vqtorch stores one `[num_codes, d]` table whose consecutive blocks of
  `num_codes // groups` rows belong to the groups, and its codes are rows of that table;
  vqfunc holds `[groups, num_codes // groups, d]` and its codes are group-local, so
  `vqtorch_code = vqfunc_code + g * (num_codes // groups)`.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import vqfunc

CASES = (
    "vq_beta0.95",
    "vq_beta0.6_sync1.5",
    "vq_affine3_dimlast",
    "vq_affine2_sync0.5_beta0.9",
    "group3_shared",
    "group3_separate",
)


def run_like_vqtorch(
    record: dict[str, Any],
) -> tuple[vqfunc.VQConfig, torch.Tensor, vqfunc.QuantizeOutput, torch.Tensor, vqfunc.VQParams]:
    """vqfunc on a record's inputs with its objective; returns cfg, z_q, out, x and params
    (both with `.grad` filled)."""
    cfg = vqfunc.VQConfig(**record["config"])
    codebook = record["codebook"].reshape(cfg.codebook_shape)
    base = vqfunc.init_params(cfg)._replace(codebook=codebook)
    params = vqfunc.VQParams(*(t.clone().requires_grad_(True) for t in base))
    x = record["x"].clone().requires_grad_(True)
    z_q, out = vqfunc.quantize(params, x, cfg)
    objective = (z_q * record["w"]).sum() + 3.0 * out.loss
    objective.backward()
    return cfg, z_q, out, x, params


def test_records_cover_the_cases(parity_records: dict[str, dict[str, Any]]) -> None:
    for name in CASES:
        assert name in parity_records
    layers = {parity_records[name]["layer"] for name in CASES}
    assert layers == {"VectorQuant", "GroupVectorQuant"}


@pytest.mark.parametrize("name", CASES)
def test_matches_vqtorch(name: str, parity_records: dict[str, dict[str, Any]]) -> None:
    record = parity_records[name]
    cfg, z_q, out, x, params = run_like_vqtorch(record)

    torch.testing.assert_close(z_q.detach(), record["z_q"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss.detach(), record["loss"], rtol=1e-5, atol=1e-7)

    codes = out.codes
    if cfg.groups == 1:
        expected_codes = record["codes"].squeeze(-1)  # vqtorch's trailing axis of size 1
    elif cfg.share:
        expected_codes = record["codes"]
    else:
        block = cfg.num_codes // cfg.groups
        expected_codes = record["codes"] - torch.arange(cfg.groups) * block
        # The same codes in vqtorch's global row convention.
        assert torch.equal(codes + torch.arange(cfg.groups) * block, record["codes"])
    assert torch.equal(codes, expected_codes)

    torch.testing.assert_close(x.grad, record["x_grad"], rtol=1e-5, atol=1e-6)
    codebook_grad = params.codebook.grad.reshape(record["codebook_grad"].shape)
    torch.testing.assert_close(codebook_grad, record["codebook_grad"], rtol=1e-5, atol=1e-6)
    if cfg.affine_lr > 0:
        torch.testing.assert_close(
            params.affine_scale.grad, record["affine_scale_raw_grad"], rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(
            params.affine_bias.grad, record["affine_bias_raw_grad"], rtol=1e-5, atol=1e-6
        )
    else:
        assert "affine_scale_raw_grad" not in record


@pytest.mark.parametrize("name", ["vq_beta0.95", "group3_separate"])
def test_layer_shim_matches_vqtorch(name: str, parity_records: dict[str, dict[str, Any]]) -> None:
    """The same numbers through the `VectorQuantize` layer, vqtorch's way of using it."""
    record = parity_records[name]
    layer = vqfunc.VectorQuantize(**record["config"])
    layer.load_params(
        layer.params._replace(codebook=record["codebook"].reshape(layer.cfg.codebook_shape))
    )
    layer.train()
    x = record["x"].clone().requires_grad_(True)
    z_q, misc = layer(x)
    ((z_q * record["w"]).sum() + 3.0 * misc["loss"].mean()).backward()
    torch.testing.assert_close(z_q.detach(), record["z_q"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(misc["loss"].detach(), record["loss"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad, record["x_grad"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        layer.codebook.grad.reshape(record["codebook_grad"].shape),
        record["codebook_grad"],
        rtol=1e-5,
        atol=1e-6,
    )
