"""The training techniques of the core against independent computations of their formulas.

Affine re-parameterisation (vqfunc/affine.py), the synchronized update and the rotation trick
(vqfunc/estimators.py), checked in float64 with explicit loops and matrices.
"""

from __future__ import annotations

import math

import pytest
import torch

import vqfunc
from vqfunc import VQConfig
from vqfunc._affine import effective_codebook, invert_affine
from vqfunc._estimators import estimate, rotation_trick, straight_through, synchronized

F64 = torch.float64


def _random_params(cfg: VQConfig, g: torch.Generator, *, raw_affine: bool) -> vqfunc.VQParams:
    params = vqfunc.init_params(cfg, generator=g, dtype=F64)
    if raw_affine:
        shape = params.affine_scale.shape
        params = params._replace(
            affine_scale=torch.randn(shape, generator=g, dtype=F64),
            affine_bias=torch.randn(shape, generator=g, dtype=F64),
        )
    return params


AFFINE_CASES = [
    {"share": True, "groups": 1, "affine_groups": 1},
    {"share": True, "groups": 2, "affine_groups": 3},
    {"share": False, "groups": 2, "affine_groups": 2},
    {"share": False, "groups": 3, "affine_groups": 6},
]


def _affine_cfg(case: dict[str, object], affine_lr: float) -> VQConfig:
    groups = int(case["groups"])  # type: ignore[call-overload]
    per_book = 12
    return VQConfig(
        feature_size=2 * groups,
        num_codes=per_book if case["share"] else per_book * groups,
        dim=-1,
        affine_lr=affine_lr,
        **case,  # type: ignore[arg-type]
    )


# --- affine re-parameterisation ---------------------------------------------------------------


@pytest.mark.parametrize("case", AFFINE_CASES)
def test_affine_with_zero_raw_params_is_the_identity(case: dict[str, object]) -> None:
    g = torch.Generator().manual_seed(0)
    cfg = _affine_cfg(case, affine_lr=10.0)
    params = vqfunc.init_params(cfg, generator=g)
    assert not params.affine_scale.any() and not params.affine_bias.any()
    assert torch.equal(effective_codebook(params, cfg), params.codebook)

    plain_cfg = cfg.replace(affine_lr=0.0)
    plain = vqfunc.init_params(plain_cfg)._replace(codebook=params.codebook)
    x = torch.randn(7, cfg.feature_size, generator=g)
    z_q, out = vqfunc.quantize(params, x, cfg)
    z_q_plain, out_plain = vqfunc.quantize(plain, x, plain_cfg)
    assert torch.equal(z_q, z_q_plain)
    assert torch.equal(out.codes, out_plain.codes)
    assert torch.equal(out.loss, out_plain.loss)


@pytest.mark.parametrize("case", AFFINE_CASES)
def test_effective_codes_follow_the_formula_per_block(case: dict[str, object]) -> None:
    g = torch.Generator().manual_seed(1)
    lr = 0.7
    cfg = _affine_cfg(case, affine_lr=lr)
    params = _random_params(cfg, g, raw_affine=True)
    books = params.codebook if not cfg.share else params.codebook.unsqueeze(0)
    scales = params.affine_scale if not cfg.share else params.affine_scale.unsqueeze(0)
    biases = params.affine_bias if not cfg.share else params.affine_bias.unsqueeze(0)
    block = cfg.codes_per_book // cfg.affine_groups
    expected = torch.empty_like(books)
    for b in range(books.shape[0]):
        for k in range(books.shape[1]):
            a = k // block  # consecutive blocks of codes share one scale and bias
            expected[b, k] = (1.0 + lr * scales[b, a]) * books[b, k] + lr * biases[b, a]
    effective = effective_codebook(params, cfg)
    torch.testing.assert_close(effective, expected.reshape(effective.shape))
    # invert_affine recovers the raw codes (used to warm an affine codebook).
    torch.testing.assert_close(invert_affine(effective, params, cfg), params.codebook)


@pytest.mark.parametrize("case", AFFINE_CASES)
def test_affine_search_and_gradients_use_the_effective_codes(case: dict[str, object]) -> None:
    g = torch.Generator().manual_seed(2)
    lr = 1.5
    cfg = _affine_cfg(case, affine_lr=lr)
    params = _random_params(cfg, g, raw_affine=True)
    x = torch.randn(9, cfg.feature_size, generator=g, dtype=F64)
    w = torch.randn(9, cfg.feature_size, generator=g, dtype=F64)

    def objective(params: vqfunc.VQParams) -> torch.Tensor:
        _, out = vqfunc.quantize(params, x, cfg)
        return (out.codewords * w).sum()  # the selected codes themselves, before the estimator

    grads = torch.func.grad(objective)(params)
    _, out = vqfunc.quantize(params, x, cfg)
    codes = out.codes.reshape(9, cfg.groups)
    rows = x.reshape(9, cfg.groups, cfg.code_dim)
    upstream = w.reshape(9, cfg.groups, cfg.code_dim)
    effective = effective_codebook(params, cfg)
    block = cfg.codes_per_book // cfg.affine_groups
    grad_scale = torch.zeros_like(params.affine_scale)
    grad_bias = torch.zeros_like(params.affine_bias)
    for i in range(9):
        for group in range(cfg.groups):
            book = effective if cfg.share else effective[group]
            distances = [(rows[i, group] - code).norm() for code in book]
            assert int(codes[i, group]) == int(torch.stack(distances).argmin())
            k = int(codes[i, group])
            raw = params.codebook[k] if cfg.share else params.codebook[group, k]
            # d(s c + b)/ds_p = lr * c, d/db_p = lr, summed over the uses of block k // block.
            index = (k // block,) if cfg.share else (group, k // block)
            grad_scale[index] += lr * raw * upstream[i, group]
            grad_bias[index] += lr * upstream[i, group]
    torch.testing.assert_close(grads.affine_scale, grad_scale)
    torch.testing.assert_close(grads.affine_bias, grad_bias)


# --- synchronized update ----------------------------------------------------------------------


def _used_code_sums(codes: torch.Tensor, upstream: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Per code, the sum of the upstream gradient rows of the vectors that selected it."""
    total = torch.zeros(shape, dtype=upstream.dtype)
    flat = total.reshape(-1, shape[-1])
    per_book = shape[-2]
    for i in range(codes.shape[0]):
        for group in range(codes.shape[1]):
            offset = 0 if len(shape) == 2 else group * per_book
            flat[offset + int(codes[i, group])] += upstream[i, group]
    return total


@pytest.mark.parametrize(("share", "groups"), [(True, 1), (True, 2), (False, 2)])
@pytest.mark.parametrize("nu", [0.5, 2.0])
def test_sync_gradient_on_used_codes_is_nu_times_upstream(
    share: bool, groups: int, nu: float
) -> None:
    g = torch.Generator().manual_seed(3)
    cfg = VQConfig(
        feature_size=3 * groups,
        num_codes=24 * (1 if share else groups),
        dim=-1,
        groups=groups,
        share=share,
        sync_nu=nu,
    )
    params = vqfunc.init_params(cfg, generator=g, dtype=F64)
    x = torch.randn(10, cfg.feature_size, generator=g, dtype=F64)
    w = torch.randn(10, cfg.feature_size, generator=g, dtype=F64)

    def task(codebook: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        z_q, _ = vqfunc.quantize(params._replace(codebook=codebook), x, cfg)
        return (z_q * w).sum()

    grad_codebook, grad_x = torch.func.grad(task, argnums=(0, 1))(params.codebook, x)
    _, out = vqfunc.quantize(params, x, cfg)
    codes = out.codes.reshape(10, groups)
    upstream = w.reshape(10, groups, cfg.code_dim)
    expected = nu * _used_code_sums(codes, upstream, params.codebook.shape)
    torch.testing.assert_close(grad_codebook, expected)
    torch.testing.assert_close(grad_x, w)  # the input still gets the straight-through identity
    unused = expected.reshape(-1, cfg.code_dim).abs().sum(-1) == 0
    assert unused.any()  # some codes are unused, and those get no gradient
    assert not grad_codebook.reshape(-1, cfg.code_dim)[unused].any()


def test_sync_gradient_adds_to_the_loss_gradient() -> None:
    g = torch.Generator().manual_seed(4)
    nu, alpha = 1.5, 3.0
    cfg = VQConfig(feature_size=4, num_codes=6, dim=-1, beta=0.6, sync_nu=nu)
    params = vqfunc.init_params(cfg, generator=g, dtype=F64)
    x = torch.randn(12, 4, generator=g, dtype=F64)
    w = torch.randn(12, 4, generator=g, dtype=F64)

    def with_loss(codebook: torch.Tensor) -> torch.Tensor:
        z_q, out = vqfunc.quantize(params._replace(codebook=codebook), x, cfg)
        return (z_q * w).sum() + alpha * out.loss

    def loss_only(codebook: torch.Tensor) -> torch.Tensor:
        _, out = vqfunc.quantize(params._replace(codebook=codebook), x, cfg)
        return alpha * out.loss

    isolated = torch.func.grad(with_loss)(params.codebook) - torch.func.grad(loss_only)(
        params.codebook
    )
    _, out = vqfunc.quantize(params, x, cfg)
    expected = nu * _used_code_sums(
        out.codes.reshape(12, 1), w.reshape(12, 1, 4), torch.Size((6, 4))
    )
    torch.testing.assert_close(isolated, expected)
    # The loss term on its own: beta * 2 (c_k - z_i) / (N F) summed over the vectors on code k.
    loss_grad = torch.zeros(6, 4, dtype=F64)
    for i, k in enumerate(out.codes.tolist()):
        loss_grad[k] += alpha * 0.6 * 2.0 * (params.codebook[k] - x[i]) / x.numel()
    torch.testing.assert_close(torch.func.grad(loss_only)(params.codebook), loss_grad)


def test_estimator_values_are_exactly_the_codes() -> None:
    g = torch.Generator().manual_seed(5)
    z = torch.randn(64, 5, generator=g) * torch.logspace(-6, 3, 5)
    z_q = torch.randn(64, 5, generator=g) * torch.logspace(3, -6, 5)
    assert torch.equal(straight_through(z, z_q), z_q)
    assert torch.equal(rotation_trick(z, z_q), z_q)
    assert torch.equal(synchronized(straight_through(z, z_q), z_q, 0.3), z_q)
    for estimator in ("ste", "rotation"):
        cfg = VQConfig(feature_size=5, num_codes=4, estimator=estimator, sync_nu=0.7)
        assert torch.equal(estimate(z, z_q, cfg), z_q)


# --- rotation trick ---------------------------------------------------------------------------


def _rotation_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The rotation taking direction `a` onto direction `b` in their common plane (identity on
    the orthogonal complement), built from an orthonormal basis of the plane and the angle."""
    u = a / a.norm()
    v = b / b.norm()
    cos = torch.clamp(u @ v, -1.0, 1.0)
    perp = v - cos * u
    e2 = perp / perp.norm()
    sin = perp.norm()
    basis = torch.stack([u, e2], 1)  # [d, 2]
    plane_rotation = torch.stack([torch.stack([cos, -sin]), torch.stack([sin, cos])])
    eye = torch.eye(a.shape[0], dtype=a.dtype)
    return eye - basis @ basis.T + basis @ plane_rotation @ basis.T


@pytest.mark.parametrize("d", [2, 3, 7])
def test_rotation_gradient_is_lambda_r_transpose_g(d: int) -> None:
    g = torch.Generator().manual_seed(6 + d)
    n = 6
    z = torch.randn(n, d, generator=g, dtype=F64)
    z_q = torch.randn(n, d, generator=g, dtype=F64) * 3.0
    upstream = torch.randn(n, d, generator=g, dtype=F64)

    def objective(z: torch.Tensor) -> torch.Tensor:
        return (rotation_trick(z, z_q) * upstream).sum()

    grad_z = torch.func.grad(objective)(z)
    assert torch.equal(rotation_trick(z, z_q), z_q)
    for i in range(n):
        rotation = _rotation_matrix(z[i], z_q[i])
        # R is orthogonal, a proper rotation, and maps z's direction onto z_q's.
        torch.testing.assert_close(rotation.T @ rotation, torch.eye(d, dtype=F64))
        torch.testing.assert_close(torch.linalg.det(rotation), torch.tensor(1.0, dtype=F64))
        torch.testing.assert_close(rotation @ (z[i] / z[i].norm()), z_q[i] / z_q[i].norm())
        lam = z_q[i].norm() / z[i].norm()
        torch.testing.assert_close(lam * rotation @ z[i], z_q[i])
        torch.testing.assert_close(grad_z[i], lam * rotation.T @ upstream[i])


def test_rotation_gives_no_gradient_to_the_code_without_sync() -> None:
    g = torch.Generator().manual_seed(8)
    z = torch.randn(4, 3, generator=g, dtype=F64)
    z_q = torch.randn(4, 3, generator=g, dtype=F64)
    grad_q = torch.func.grad(lambda q: rotation_trick(z, q).sum())(z_q)
    assert not grad_q.any()


def test_rotation_of_a_zero_vector_falls_back_to_straight_through() -> None:
    z = torch.zeros(2, 3, dtype=F64)
    z_q = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], dtype=F64)
    upstream = torch.tensor([[0.3, -0.2, 1.0], [2.0, 0.0, -1.0]], dtype=F64)
    grad = torch.func.grad(lambda z: (rotation_trick(z, z_q) * upstream).sum())(z)
    assert torch.equal(rotation_trick(z, z_q), z_q)
    torch.testing.assert_close(grad, upstream)


def test_rotation_with_sync_through_quantize() -> None:
    g = torch.Generator().manual_seed(9)
    nu = 0.8
    cfg = VQConfig(feature_size=4, num_codes=5, dim=-1, estimator="rotation", sync_nu=nu)
    params = vqfunc.init_params(cfg, generator=g, dtype=F64)
    x = torch.randn(8, 4, generator=g, dtype=F64)
    w = torch.randn(8, 4, generator=g, dtype=F64)

    def task(codebook: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        z_q, _ = vqfunc.quantize(params._replace(codebook=codebook), x, cfg)
        return (z_q * w).sum()

    grad_codebook, grad_x = torch.func.grad(task, argnums=(0, 1))(params.codebook, x)
    z_q, out = vqfunc.quantize(params, x, cfg)
    assert torch.equal(z_q, out.codewords)
    for i in range(8):
        code = out.codewords[i]
        lam = code.norm() / x[i].norm()
        expected = lam * _rotation_matrix(x[i], code).T @ w[i]
        torch.testing.assert_close(grad_x[i], expected)
    expected_codebook = nu * _used_code_sums(
        out.codes.reshape(8, 1), w.reshape(8, 1, 4), params.codebook.shape
    )
    torch.testing.assert_close(grad_codebook, expected_codebook)


# --- the estimators under torch.func.grad -----------------------------------------------------


@pytest.mark.parametrize("estimator", ["ste", "rotation"])
@pytest.mark.parametrize("nu", [0.0, 1.25])
def test_estimators_under_func_grad_match_autograd(estimator: str, nu: float) -> None:
    g = torch.Generator().manual_seed(10)
    cfg = VQConfig(feature_size=5, num_codes=3, estimator=estimator, sync_nu=nu)  # type: ignore[arg-type]
    z = torch.randn(6, 5, generator=g, dtype=F64)
    z_q = torch.randn(6, 5, generator=g, dtype=F64)
    upstream = torch.randn(6, 5, generator=g, dtype=F64)

    def objective(z: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
        return (estimate(z, z_q, cfg) * upstream).sum()

    grad_z, grad_q = torch.func.grad(objective, argnums=(0, 1))(z, z_q)
    z_leaf, q_leaf = z.clone().requires_grad_(), z_q.clone().requires_grad_()
    objective(z_leaf, q_leaf).backward()
    torch.testing.assert_close(grad_z, z_leaf.grad)
    # Without sync nothing reaches the code: autograd leaves its .grad unset.
    torch.testing.assert_close(
        grad_q, torch.zeros_like(z_q) if q_leaf.grad is None else q_leaf.grad
    )
    torch.testing.assert_close(grad_q, nu * upstream)
    if estimator == "ste":
        torch.testing.assert_close(grad_z, upstream)
    else:
        for i in range(6):
            lam = z_q[i].norm() / z[i].norm()
            expected = lam * _rotation_matrix(z[i], z_q[i]).T @ upstream[i]
            torch.testing.assert_close(grad_z[i], expected)
    assert math.isfinite(float(grad_z.abs().max()))
