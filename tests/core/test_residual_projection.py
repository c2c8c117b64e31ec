"""Residual VQ with low-dimensional codebooks (`codebook_dim`): learned projections per level,
DAC's factorised cosine lookup, against a float64 reference written here with autograd."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import vqfunc
from vqfunc.residual import ResidualConfig, ResidualParams

L, FEAT, D = 3, 6, 2


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _setup(dist: str = "euclidean", seed: int = 0, **kw: Any) -> tuple[ResidualConfig, Any]:
    options: dict[str, Any] = dict(num_codes=(16, 8, 4), share=False)
    options.update(kw)
    cfg = ResidualConfig(
        feature_size=FEAT, levels=L, dim=-1, codebook_dim=D, dist=dist, beta=0.75, **options
    )  # type: ignore[arg-type]
    params = vqfunc.residual.init_params(cfg, generator=_gen(seed), dtype=torch.float64)
    # Non-zero biases, so that the test sees them.
    params = params._replace(
        proj_in_bias=0.1 * torch.randn(L, D, generator=_gen(seed + 1), dtype=torch.float64),
        proj_out_bias=0.1 * torch.randn(L, FEAT, generator=_gen(seed + 2), dtype=torch.float64),
    )
    return cfg, params


def _reference(p: Any, x: torch.Tensor, cfg: ResidualConfig, n: int, beta: float) -> Any:
    """DAC's factorised residual VQ, level by level: `(codes, z_q, loss)`."""
    r, total, loss, codes = x, torch.zeros_like(x), x.new_zeros(()), []
    for i in range(n):
        book = p.codebook if cfg.share else p.codebook[i, : cfg.level_sizes[i]]
        e = r @ p.proj_in[i] + p.proj_in_bias[i]
        if cfg.dist == "cosine":
            c_idx = (F.normalize(e.detach(), dim=-1) @ F.normalize(book, dim=-1).T).argmax(-1)
        else:
            c_idx = torch.cdist(e.detach(), book).argmin(-1)
        c = book[c_idx]
        loss = loss + (1 - beta) * (e - c.detach()).pow(2).mean()
        loss = loss + beta * (e.detach() - c).pow(2).mean()
        q = (e + (c - e).detach()) @ p.proj_out[i] + p.proj_out_bias[i]
        r, total = r - q, total + q
        codes.append(c_idx)
    return torch.stack(codes, -1), total, loss


@pytest.mark.parametrize("dist", ["euclidean", "cosine"])
@pytest.mark.parametrize("n", [1, 2, L])
def test_values_and_gradients_match_the_reference(dist: str, n: int) -> None:
    cfg, params = _setup(dist)
    x = torch.randn(30, FEAT, generator=_gen(5), dtype=torch.float64)
    w = torch.randn(30, FEAT, generator=_gen(6), dtype=torch.float64)

    def run(fn: Any) -> tuple[Any, list[torch.Tensor]]:
        leaves = [t.detach().clone().requires_grad_(t.numel() > 0) for t in params]
        xx = x.clone().requires_grad_()
        p = ResidualParams(*leaves)
        codes, z_q, loss = fn(p, xx)
        ((z_q * w).sum() + loss).backward()
        grads = [t.grad for t in (xx, p.codebook, *leaves[3:])]
        return (codes, z_q.detach(), loss.detach()), grads  # type: ignore[return-value]

    def library(p: Any, xx: torch.Tensor) -> Any:
        z_q, out = vqfunc.residual.quantize(p, xx, cfg, n_levels=n)
        return out.codes, z_q, out.loss

    (codes, z_q, loss), grads = run(library)
    (codes_ref, z_ref, loss_ref), grads_ref = run(lambda p, xx: _reference(p, xx, cfg, n, 0.75))
    assert torch.equal(codes, codes_ref)
    torch.testing.assert_close(z_q, z_ref)
    torch.testing.assert_close(loss, loss_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert g is not None and g_ref is not None
        torch.testing.assert_close(g, g_ref)
    assert float(grads[1].abs().sum()) > 0  # the codes learn through the loss
    assert all(float(g[:n].abs().sum()) > 0 for g in grads[2:])  # every projection that ran


def test_prefix_decoding_dropout_and_grad_with_projections() -> None:
    cfg, params = _setup("cosine")
    x = torch.randn(12, FEAT, generator=_gen(7), dtype=torch.float64)
    _, full = vqfunc.residual.quantize(params, x, cfg)
    for n in range(1, L + 1):
        z_q, out = vqfunc.residual.quantize(params, x, cfg, n_levels=n)
        assert torch.equal(out.codes, full.codes[:, :n])
        torch.testing.assert_close(
            vqfunc.residual.dequantize(params, full.codes, cfg, n_levels=n), z_q
        )
        torch.testing.assert_close(out.codewords, z_q)
    depth = torch.tensor([1, 2, 3] * 4)
    z_q, out = vqfunc.residual.quantize(params, x, cfg, depth=depth)
    for i, d in enumerate(depth.tolist()):
        ref = vqfunc.residual.dequantize(params, full.codes[i], cfg, n_levels=d)
        torch.testing.assert_close(z_q[i], ref)

    def loss(p: ResidualParams) -> torch.Tensor:
        z_q, out = vqfunc.residual.quantize(p, x, cfg)
        return z_q.square().mean() + out.loss

    grads = torch.func.grad(loss)(params)
    assert isinstance(grads, ResidualParams) and float(grads.proj_out.abs().sum()) > 0


def test_warm_up_and_replacement_work_in_the_projected_space() -> None:
    cfg, params = _setup(replace_freq=1)
    x = torch.randn(50, FEAT, generator=_gen(8), dtype=torch.float64)
    e0 = x @ params.proj_in[0] + params.proj_in_bias[0]
    warm = vqfunc.residual.warmup_params(params, x, cfg, method="data", generator=_gen(9))
    assert isinstance(warm, ResidualParams) and warm.codebook.shape == (L, 16, D)
    assert torch.equal(warm.proj_in, params.proj_in)
    for code in warm.codebook[0]:
        assert float((e0 - code).norm(dim=-1).min()) < 1e-9  # level 0's codes are rows of e_0
    far = params._replace(codebook=params.codebook + 1e3)  # every code dead
    _, out = vqfunc.residual.quantize(far, x, cfg)
    state = vqfunc.residual.init_state(far, cfg)
    new, _ = vqfunc.residual.update_state(far, state, out, cfg, generator=_gen(10))
    assert isinstance(new, ResidualParams) and torch.equal(new.proj_out, far.proj_out)
    unused = out.histogram[0] == 0
    assert int(unused.sum()) >= 15
    for code in new.codebook[0][unused]:
        gap = (e0 - code).norm(dim=-1).min() / e0.norm(dim=-1).max()
        assert float(gap) < 0.05  # a searched (projected) vector, plus rho-sized noise
    assert torch.equal(new.codebook[0, 16:], far.codebook[0, 16:])


def test_the_layer_holds_the_projections_and_old_layers_have_none() -> None:
    layer = vqfunc.ResidualVectorQuantize(
        FEAT, (16, 8, 4), levels=L, share=False, dim=-1, codebook_dim=D, dist="cosine"
    )
    assert isinstance(layer.params, ResidualParams)
    x = torch.randn(4, 5, FEAT)
    z_q, _ = layer(x)
    params = {k: v.detach() for k, v in layer.params._asdict().items()}
    z_ref, _ = vqfunc.residual.quantize(layer.params, x, layer.cfg)
    torch.testing.assert_close(z_q, z_ref)
    z_call, _ = torch.func.functional_call(layer, params, (x,))
    torch.testing.assert_close(z_call, z_ref)
    fresh = vqfunc.ResidualVectorQuantize(
        FEAT, (16, 8, 4), levels=L, share=False, dim=-1, codebook_dim=D, dist="cosine"
    )
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.proj_in, layer.proj_in)
    plain = vqfunc.ResidualVectorQuantize(FEAT, 16, levels=L, dim=-1)
    assert not any(k.startswith("proj") for k in plain.state_dict())
    assert type(plain.params) is vqfunc.VQParams


def test_bad_projection_settings_are_refused() -> None:
    with pytest.raises(ValueError, match=r"dist='cosine' needs codebook_dim"):
        ResidualConfig(feature_size=4, num_codes=8, dist="cosine")
    with pytest.raises(ValueError, match=r"codebook_dim must be a positive int, got 0"):
        ResidualConfig(feature_size=4, num_codes=8, codebook_dim=0)
    with pytest.raises(ValueError, match=r"needs estimator='ste' and sync_nu=0"):
        ResidualConfig(feature_size=4, num_codes=8, codebook_dim=2, estimator="rotation")
    cfg, params = _setup()
    plain = vqfunc.VQParams(*params[:3])
    with pytest.raises(
        TypeError, match=r"params must be a ResidualParams \(cfg.codebook_dim is set\)"
    ):
        vqfunc.residual.quantize(plain, torch.randn(2, FEAT, dtype=torch.float64), cfg)
    with pytest.raises(
        ValueError, match=r"params.proj_in has shape \(3, 6, 3\).*expects \(3, 6, 2\)"
    ):
        vqfunc.residual.quantize(
            params._replace(proj_in=torch.zeros(3, 6, 3, dtype=torch.float64)),
            torch.randn(2, FEAT, dtype=torch.float64),
            cfg,
        )


def test_checkpoint_round_trip_of_a_projected_layer() -> None:
    layer = vqfunc.ResidualVectorQuantize(
        FEAT, (16, 8, 4), levels=L, share=False, dim=-1, codebook_dim=D, replace_freq=2
    )
    params, state = vqfunc.checkpoint.from_layer_state_dict(layer.state_dict(), layer.cfg)
    assert isinstance(params, ResidualParams)
    for name, value in layer.params._asdict().items():
        assert torch.equal(getattr(params, name), value)
    flat = vqfunc.checkpoint.layer_state_dict(params, state, cfg=layer.cfg)
    assert set(flat) == set(layer.state_dict())
