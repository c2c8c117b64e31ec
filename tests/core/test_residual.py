"""Residual VQ: parity with vqtorch, brute-force checks in float64, shapes, the shim, errors."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

import vqfunc
from vqfunc import ResidualVectorQuantize, VQParams
from vqfunc.residual import ResidualConfig

RESIDUAL_RECORDS = ("residual3_shared", "residual3_separate")


def _config_from_record(record: dict[str, Any]) -> ResidualConfig:
    c = record["config"]
    return ResidualConfig(
        feature_size=c["feature_size"],
        num_codes=c["num_codes"],
        levels=c["groups"],
        share=c["share"],
        dim=c["dim"],
        beta=c.get("beta", 0.95),
    )


def _vqtorch_codes(codes: torch.Tensor, cfg: ResidualConfig) -> torch.Tensor:
    """vqtorch's codes: with separate codebooks, row indices into the flat `[num_codes, F]`
    codebook, i.e. level `i`'s code plus `i * codes_per_book`."""
    if cfg.share:
        return codes
    return codes + torch.arange(cfg.levels) * cfg.codes_per_book


# --- parity with vqtorch ----------------------------------------------------------------------


@pytest.mark.parametrize("name", RESIDUAL_RECORDS)
def test_functional_parity_with_vqtorch(name: str, parity_records: dict[str, Any]) -> None:
    record = parity_records[name]
    cfg = _config_from_record(record)
    codebook = record["codebook"].clone().reshape(cfg.codebook_shape).requires_grad_()
    params = vqfunc.residual.init_params(cfg)._replace(codebook=codebook)
    x = record["x"].clone().requires_grad_()
    z_q, out = vqfunc.residual.quantize(params, x, cfg)
    ((z_q * record["w"]).sum() + 3.0 * out.loss).backward()

    torch.testing.assert_close(z_q, record["z_q"])
    assert torch.equal(_vqtorch_codes(out.codes, cfg), record["codes"])
    torch.testing.assert_close(out.loss, record["loss"])
    torch.testing.assert_close(x.grad, record["x_grad"])
    assert codebook.grad is not None
    torch.testing.assert_close(codebook.grad.reshape(-1, cfg.feature_size), record["codebook_grad"])


@pytest.mark.parametrize("name", RESIDUAL_RECORDS)
def test_shim_parity_with_vqtorch_arguments(name: str, parity_records: dict[str, Any]) -> None:
    record = parity_records[name]
    # vqtorch's arguments, as written for vqtorch (groups = number of levels).
    layer = ResidualVectorQuantize(**record["config"])
    with torch.no_grad():
        layer.codebook.copy_(record["codebook"].reshape(layer.codebook.shape))
    layer.train()
    x = record["x"].clone().requires_grad_()
    z_q, misc = layer(x)
    ((z_q * record["w"]).sum() + 3.0 * misc["loss"]).backward()

    torch.testing.assert_close(z_q, record["z_q"])
    assert torch.equal(_vqtorch_codes(misc["q"], layer.cfg), record["codes"])
    torch.testing.assert_close(misc["loss"], record["loss"])
    torch.testing.assert_close(x.grad, record["x_grad"])
    assert layer.codebook.grad is not None
    torch.testing.assert_close(
        layer.codebook.grad.reshape(-1, layer.cfg.feature_size), record["codebook_grad"]
    )


# --- brute force over ranks, dims, levels, sharing --------------------------------------------


@dataclass(frozen=True)
class Case:
    cfg: ResidualConfig
    shape: tuple[int, ...]
    seed: int


@st.composite
def cases(draw: st.DrawFn) -> Case:
    rank = draw(st.integers(1, 4))
    feature_size = draw(st.integers(1, 5))
    levels = draw(st.integers(1, 4))
    share = draw(st.booleans())
    per_book = draw(st.integers(1, 7))
    axis = draw(st.integers(0, rank - 1))
    dim = axis if draw(st.booleans()) else axis - rank
    shape = [draw(st.integers(0 if draw(st.booleans()) else 1, 3)) for _ in range(rank)]
    shape[axis] = feature_size
    cfg = ResidualConfig(
        feature_size=feature_size,
        num_codes=per_book if share else per_book * levels,
        levels=levels,
        share=share,
        dim=dim,
    )
    return Case(cfg, tuple(shape), draw(st.integers(0, 2**16)))


def _brute_force(
    codebook: torch.Tensor, rows: torch.Tensor, cfg: ResidualConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes `[M, L]` and residuals `[M, L + 1, F]` by a loop over rows and levels, float64."""
    all_codes, all_residuals = [], []
    for row in rows.double():
        residual, codes, residuals = row, [], [row]
        for level in range(cfg.levels):
            book = (codebook if cfg.share else codebook[level]).double()
            distances = [torch.sqrt(((residual - code) ** 2).sum()) for code in book]
            best = int(torch.stack(distances).argmin())
            residual = residual - book[best]
            codes.append(best)
            residuals.append(residual)
        all_codes.append(torch.tensor(codes))
        all_residuals.append(torch.stack(residuals))
    m = rows.shape[0]
    codes_out = torch.stack(all_codes) if m else torch.zeros(0, cfg.levels, dtype=torch.long)
    residuals_out = (
        torch.stack(all_residuals)
        if m
        else torch.zeros(0, cfg.levels + 1, cfg.feature_size, dtype=torch.float64)
    )
    return codes_out, residuals_out


@given(cases())
def test_codes_are_nearest_at_every_level_and_dequantize_inverts(case: Case) -> None:
    cfg = case.cfg
    g = torch.Generator().manual_seed(case.seed)
    params = vqfunc.residual.init_params(cfg, generator=g, dtype=torch.float64)
    x = torch.randn(case.shape, generator=g, dtype=torch.float64)
    z_q, out = vqfunc.residual.quantize(params, x, cfg)

    batch = tuple(s for i, s in enumerate(x.shape) if i != cfg.dim % x.ndim)
    assert z_q.shape == x.shape and z_q.dtype == x.dtype
    assert out.codes.shape == (*batch, cfg.levels) and out.codes.dtype == torch.int64
    assert out.distances.shape == (*batch, cfg.levels)
    assert out.residuals.shape == (*batch, cfg.levels + 1, cfg.feature_size)
    assert out.loss.ndim == 0

    rows = x.movedim(cfg.dim, -1).reshape(-1, cfg.feature_size)
    codes, residuals = _brute_force(params.codebook, rows, cfg)
    assert torch.equal(out.codes.reshape(-1, cfg.levels), codes)
    torch.testing.assert_close(out.residuals.reshape(residuals.shape), residuals)
    torch.testing.assert_close(out.distances.reshape(codes.shape), residuals[:, 1:].norm(dim=-1))
    # z_q is the sum of the levels: the input minus the last residual.
    expected = (rows.double() - residuals[:, -1]).reshape(*batch, cfg.feature_size)
    torch.testing.assert_close(z_q, expected.movedim(-1, cfg.dim % x.ndim))
    decoded = vqfunc.residual.dequantize(params, out.codes, cfg)
    assert decoded.shape == x.shape
    torch.testing.assert_close(decoded, z_q)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_keep_their_dtype(dtype: torch.dtype) -> None:
    cfg = ResidualConfig(feature_size=6, num_codes=12, levels=3, share=False, dim=-1)
    g = torch.Generator().manual_seed(1)
    params = vqfunc.residual.init_params(cfg, generator=g)
    x = torch.randn(4, 5, 6, generator=g).to(dtype)
    z_q, out = vqfunc.residual.quantize(params, x, cfg)
    assert z_q.dtype == dtype
    # Codes are searched in float32 on the input as given.
    _, reference = vqfunc.residual.quantize(params, x.float(), cfg)
    assert torch.equal(out.codes, reference.codes)
    torch.testing.assert_close(z_q, out.codewords.to(dtype))


def test_dequantize_sums_each_levels_own_codebook(generator: torch.Generator) -> None:
    cfg = ResidualConfig(feature_size=3, num_codes=15, levels=3, share=False, dim=-1)
    params = vqfunc.residual.init_params(cfg, generator=generator)
    codes = torch.randint(5, (4, 2, 3), generator=generator)
    expected = torch.zeros(4, 2, 3)
    for level in range(3):
        expected += params.codebook[level][codes[..., level]]
    torch.testing.assert_close(vqfunc.residual.dequantize(params, codes, cfg), expected)


# --- residual error decreases with the number of levels, on real data -------------------------


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = torch.from_numpy(load_digits().data).float() / 16.0
    return data[:1000], data[1000:]


def _fitted_error(levels: int, share: bool) -> tuple[float, torch.Tensor]:
    """Held-out mean squared error of a residual quantizer warmed with k-means on digits, and
    the mean squared residual left after each level."""
    train, test = _digits()
    cfg = ResidualConfig(
        feature_size=64, num_codes=8 if share else 8 * levels, levels=levels, share=share, dim=-1
    )
    params = vqfunc.residual.init_params(cfg, generator=torch.Generator().manual_seed(1))
    # The same warm-up seed for every number of levels: the first levels come out identical.
    warm = torch.Generator().manual_seed(0)
    params = vqfunc.residual.warmup_params(
        params, train, cfg, method="kmeans", generator=warm, kmeans_iters=8
    )
    z_q, out = vqfunc.residual.quantize(params, test, cfg)
    return float((test - z_q).square().mean()), out.distances.square().mean(0)


def test_error_decreases_with_levels_on_digits() -> None:
    errors = []
    for levels in (1, 2, 3):
        error, per_level = _fitted_error(levels, share=False)
        errors.append(error)
        # Within one quantizer, every level leaves a smaller residual (on held-out data).
        assert torch.all(per_level[1:] < per_level[:-1]), per_level
    assert all(b < a for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 0.8 * errors[0], errors


def test_shared_codebook_levels_reduce_the_residual_on_digits() -> None:
    _, per_level = _fitted_error(3, share=True)
    assert torch.all(per_level[1:] < per_level[:-1]), per_level


def test_warmup_leaves_params_unchanged(generator: torch.Generator) -> None:
    cfg = ResidualConfig(feature_size=4, num_codes=6, levels=2, share=False, dim=-1)
    params = vqfunc.residual.init_params(cfg, generator=generator)
    before = params.codebook.clone()
    new = vqfunc.residual.warmup_params(params, torch.randn(50, 4, generator=generator), cfg)
    assert torch.equal(params.codebook, before)
    assert new.codebook.shape == before.shape and not torch.equal(new.codebook, before)


# --- gradients, techniques on the sum, masks --------------------------------------------------


def _one_hot_sum(codes: torch.Tensor, upstream: torch.Tensor, num: int) -> torch.Tensor:
    """`[num, F]`: for each code, the sum of the upstream rows that selected it (a loop)."""
    total = torch.zeros(num, upstream.shape[-1], dtype=upstream.dtype)
    for code, row in zip(codes.tolist(), upstream, strict=True):
        total[code] += row
    return total


def test_sync_gradient_reaches_every_levels_code(generator: torch.Generator) -> None:
    nu = 0.7
    cfg = ResidualConfig(feature_size=5, num_codes=12, levels=3, share=False, dim=-1, sync_nu=nu)
    params = vqfunc.residual.init_params(cfg, generator=generator, dtype=torch.float64)
    x = torch.randn(20, 5, generator=generator, dtype=torch.float64)
    w = torch.randn(20, 5, generator=generator, dtype=torch.float64)

    def objective(codebook: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        z_q, _ = vqfunc.residual.quantize(params._replace(codebook=codebook), x, cfg)
        return (z_q * w).sum()  # the loss is left out to isolate the synchronized term

    grad_codebook, grad_x = torch.func.grad(objective, argnums=(0, 1))(params.codebook, x)
    _, out = vqfunc.residual.quantize(params, x, cfg)
    for level in range(cfg.levels):
        expected = nu * _one_hot_sum(out.codes[:, level], w, cfg.codes_per_book)
        torch.testing.assert_close(grad_codebook[level], expected)
    torch.testing.assert_close(grad_x, w)  # straight-through to the input


def test_affine_with_zero_raw_params_changes_nothing(generator: torch.Generator) -> None:
    base = ResidualConfig(feature_size=4, num_codes=8, levels=2, share=True, dim=-1)
    affine = base.replace(affine_lr=5.0, affine_groups=2)
    params = vqfunc.residual.init_params(base, generator=generator)
    affine_params = vqfunc.residual.init_params(affine)._replace(codebook=params.codebook)
    assert affine_params.affine_scale.shape == (2, 4)
    x = torch.randn(10, 4, generator=generator)
    z_q, out = vqfunc.residual.quantize(params, x, base)
    z_q_affine, out_affine = vqfunc.residual.quantize(affine_params, x, affine)
    assert torch.equal(z_q, z_q_affine) and torch.equal(out.codes, out_affine.codes)


def test_separate_affine_acts_per_level(generator: torch.Generator) -> None:
    cfg = ResidualConfig(feature_size=3, num_codes=8, levels=2, share=False, dim=-1, affine_lr=2.0)
    params = vqfunc.residual.init_params(cfg, generator=generator, dtype=torch.float64)
    params = params._replace(
        affine_scale=torch.randn(2, 1, 3, generator=generator, dtype=torch.float64),
        affine_bias=torch.randn(2, 1, 3, generator=generator, dtype=torch.float64),
    )
    codes = torch.randint(4, (6, 2), generator=generator)
    expected = torch.zeros(6, 3, dtype=torch.float64)
    for level in range(2):
        scale = 1 + 2.0 * params.affine_scale[level, 0]
        bias = 2.0 * params.affine_bias[level, 0]
        expected += scale * params.codebook[level][codes[:, level]] + bias
    torch.testing.assert_close(vqfunc.residual.dequantize(params, codes, cfg), expected)


def test_mask_excludes_rows_from_loss_and_histogram(generator: torch.Generator) -> None:
    cfg = ResidualConfig(feature_size=4, num_codes=6, levels=2, share=True, dim=-1)
    params = vqfunc.residual.init_params(cfg, generator=generator)
    x = torch.randn(9, 4, generator=generator)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1], dtype=torch.bool)
    z_q, out = vqfunc.residual.quantize(params, x, cfg, mask=mask)
    _, kept = vqfunc.residual.quantize(params, x[mask], cfg)
    torch.testing.assert_close(out.loss, kept.loss)
    torch.testing.assert_close(out.histogram, kept.histogram)
    assert out.histogram.sum() == 2 * int(mask.sum())
    assert z_q.shape == x.shape


# --- the shim --------------------------------------------------------------------------------


def test_functional_call_on_the_shim_equals_the_pure_call(generator: torch.Generator) -> None:
    layer = ResidualVectorQuantize(8, 12, 3, False, affine_lr=1.0, generator=generator)
    assert {name for name, _ in layer.named_parameters()} == set(VQParams._fields)
    params = VQParams(*(torch.randn(p.shape, generator=generator) for p in layer.params))
    x = torch.randn(2, 8, 3, generator=generator)
    z_q, misc = torch.func.functional_call(layer, params._asdict(), (x,))
    z_q_pure, out = vqfunc.residual.quantize(params, x, layer.cfg)
    torch.testing.assert_close(z_q, z_q_pure)
    assert torch.equal(misc["codes"], out.codes) and misc["codes"].shape == (2, 3, 3)
    assert misc["q"] is misc["codes"] and misc["z_res"] is misc["residuals"]
    torch.testing.assert_close(misc["loss"], out.loss)


def test_layer_loads_warmed_params(generator: torch.Generator) -> None:
    train = _digits()[0][:300]
    layer = ResidualVectorQuantize(64, 16, levels=2, dim=-1, generator=generator)
    _, before = layer(train)
    warmed = vqfunc.residual.warmup_params(
        layer.params, train, layer.cfg, method="kmeans", generator=generator
    )
    layer.load_params(warmed)
    _, after = layer(train)
    assert after["loss"] < before["loss"]


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"levels": 0}, "levels must be a positive int, got 0"),
        ({"share": False, "num_codes": 10}, "num_codes=10 counts the codes of all 3 levels"),
        ({"affine_groups": 5}, "affine_groups=5 must divide the 12 codes"),
        ({"beta": 1.5}, "ResidualConfig: beta must be in [0.0, 1.0], got 1.5"),
        ({"estimator": "gumbel"}, "ResidualConfig: estimator must be one of"),
    ],
)
def test_config_errors_name_the_argument(changes: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {"feature_size": 4, "num_codes": 12, "levels": 3, **changes}
    with pytest.raises(ValueError) as info:
        ResidualConfig(**fields)
    assert message in str(info.value)


def test_config_refuses_a_non_int_dim() -> None:
    with pytest.raises(TypeError, match="ResidualConfig: dim must be an int, got 'x'"):
        ResidualConfig(feature_size=4, num_codes=6, dim="x")  # type: ignore[arg-type]


def test_call_errors_name_the_argument(generator: torch.Generator) -> None:
    cfg = ResidualConfig(feature_size=4, num_codes=6, levels=2, share=False, dim=-1)
    params = vqfunc.residual.init_params(cfg, generator=generator)
    with pytest.raises(
        TypeError, match=r"cfg must be a vqfunc\.residual\.ResidualConfig.*functions of vqfunc\)"
    ):
        vqfunc.residual.quantize(
            params, torch.randn(3, 4), vqfunc.VQConfig(feature_size=4, num_codes=6)
        )
    with pytest.raises(ValueError, match=r"x has 5 features on dim=-1"):
        vqfunc.residual.quantize(params, torch.randn(3, 5), cfg)
    other = vqfunc.residual.init_params(cfg.replace(share=True))
    with pytest.raises(
        ValueError, match=r"params.codebook has shape \(6, 4\).*levels=2.*\(2, 3, 4\)"
    ):
        vqfunc.residual.quantize(other, torch.randn(3, 4), cfg)
    with pytest.raises(ValueError, match="trailing axis of size levels=2"):
        vqfunc.residual.dequantize(params, torch.zeros(3, dtype=torch.long), cfg)
    with pytest.raises(TypeError, match="integer tensor"):
        vqfunc.residual.dequantize(params, torch.zeros(3, 2), cfg)
    with pytest.raises(ValueError, match="groups=2 and levels=3"):
        ResidualVectorQuantize(4, 6, 2, levels=3)


def test_no_vq_turns_the_residual_layer_into_an_identity(generator: torch.Generator) -> None:
    layer = ResidualVectorQuantize(4, 6, 2, dim=-1, generator=generator)
    x = torch.randn(3, 4, generator=generator)
    with vqfunc.no_vq(layer):
        z_q, misc = layer(x)
    assert z_q is x and float(misc["loss"]) == 0.0
    assert not torch.equal(layer(x)[0], x)


def test_vmap_over_param_sets_equals_a_loop(generator: torch.Generator) -> None:
    cfg = ResidualConfig(feature_size=6, num_codes=12, levels=3, share=False, dim=-1, sync_nu=0.5)
    sets = [vqfunc.residual.init_params(cfg, generator=generator) for _ in range(3)]
    stacked = VQParams(*(torch.stack(fields) for fields in zip(*sets, strict=True)))
    x = torch.randn(10, 6, generator=generator)
    z_q, out = torch.func.vmap(lambda p: vqfunc.residual.quantize(p, x, cfg))(stacked)
    for i, params in enumerate(sets):
        want_z_q, want = vqfunc.residual.quantize(params, x, cfg)
        torch.testing.assert_close(z_q[i], want_z_q)
        assert torch.equal(out.codes[i], want.codes)
        torch.testing.assert_close(out.loss[i], want.loss)


def test_kmeans_init_fits_once_on_the_first_training_batch(generator: torch.Generator) -> None:
    layer = ResidualVectorQuantize(4, 6, 2, False, dim=-1, kmeans_init=True, generator=generator)
    x = torch.randn(40, 4, generator=generator)
    layer.eval()
    layer(x)  # evaluation mode fits nothing
    assert not layer.kmeans_initialized
    before = VQParams(*(p.detach().clone() for p in layer.params))

    # Under functional_call the given tensors are never written.
    given = VQParams(*(p.clone() for p in before))
    layer.train()
    torch.func.functional_call(layer, given._asdict(), (x,))
    assert torch.equal(given.codebook, before.codebook) and not layer.kmeans_initialized

    torch.manual_seed(5)
    layer(x)
    torch.manual_seed(5)
    want = vqfunc.residual.warmup_params(before, x, layer.cfg, method="kmeans")
    assert torch.equal(layer.codebook, want.codebook) and layer.kmeans_initialized
    layer(torch.randn(40, 4, generator=generator))  # fitted once only
    assert torch.equal(layer.codebook, want.codebook)

    fresh = ResidualVectorQuantize(4, 6, 2, False, dim=-1, kmeans_init=True)
    fresh.load_state_dict(layer.state_dict())
    fresh(torch.randn(40, 4, generator=generator))
    assert torch.equal(fresh.codebook, want.codebook)
