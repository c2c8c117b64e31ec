"""Codec features of residual VQ: fewer levels, per-level sizes, quantizer dropout, bitrate.

References are written here, independently of the library: a float64 brute-force residual
quantizer (`torch.cdist` + argmin, level after level) and EnCodec's published bitrates.
"""

from __future__ import annotations

import math

import pytest
import torch

import vqfunc
from vqfunc.residual import ResidualConfig

L = 4


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference(
    codebook: torch.Tensor, x: torch.Tensor, sizes: tuple[int, ...], share: bool, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force in float64: `(codes [M, n], z_q [M, F])`."""
    residual = x.double()
    codes, total = [], torch.zeros_like(residual)
    for level in range(n):
        book = (codebook if share else codebook[level, : sizes[level]]).double()
        c = torch.cdist(residual, book).argmin(-1)
        codes.append(c)
        total = total + book[c]
        residual = residual - book[c]
    return torch.stack(codes, -1), total


CONFIGS = {
    "shared": dict(num_codes=16, share=True),
    "separate": dict(num_codes=16 * L, share=False),
    "per_level": dict(num_codes=(16, 9, 5, 2), share=False),
}


def _setup(name: str, seed: int = 0, **kw: object) -> tuple[ResidualConfig, vqfunc.VQParams]:
    cfg = ResidualConfig(feature_size=3, levels=L, dim=-1, **CONFIGS[name], **kw)  # type: ignore[arg-type]
    return cfg, vqfunc.residual.init_params(cfg, generator=_gen(seed))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_quantizing_with_n_levels_equals_decoding_the_first_n_full_codes(name: str) -> None:
    cfg, params = _setup(name)
    x = 2 * torch.randn(40, 3, generator=_gen(1))
    _, full = vqfunc.residual.quantize(params, x, cfg)
    for n in range(1, L + 1):
        z_q, out = vqfunc.residual.quantize(params, x, cfg, n_levels=n)
        assert out.codes.shape == (40, n) and out.residuals.shape == (40, n + 1, 3)
        assert torch.equal(out.codes, full.codes[:, :n])
        from_full = vqfunc.residual.dequantize(params, full.codes, cfg, n_levels=n)
        from_prefix = vqfunc.residual.dequantize(params, full.codes[:, :n], cfg, n_levels=n)
        torch.testing.assert_close(z_q, from_full, rtol=0, atol=1e-6)
        assert torch.equal(from_full, from_prefix)
        codes_ref, z_ref = _reference(params.codebook, x, cfg.level_sizes, cfg.share, n)
        assert torch.equal(out.codes, codes_ref)
        torch.testing.assert_close(z_q.double(), z_ref, rtol=0, atol=1e-5)
        assert float(out.histogram.sum()) == 40 * n


def test_per_level_sizes_search_only_their_own_codes() -> None:
    cfg, params = _setup("per_level")
    assert cfg.codebook_shape == (L, 16, 3) and cfg.level_sizes == (16, 9, 5, 2)
    x = 2 * torch.randn(200, 3, generator=_gen(2))
    # Padding rows placed on the data itself would be the nearest codes if they were searched.
    codebook = params.codebook.clone()
    for level, k in enumerate(cfg.level_sizes):
        codebook[level, k:] = x[: 16 - k]
    params = params._replace(codebook=codebook.requires_grad_())
    z_q, out = vqfunc.residual.quantize(params, x, cfg)
    for level, k in enumerate(cfg.level_sizes):
        assert int(out.codes[:, level].max()) < k
        assert float(out.histogram[level, k:].abs().sum()) == 0.0
        counts = torch.bincount(out.codes[:, level], minlength=16).float()
        assert torch.equal(out.histogram[level], counts)
    codes_ref, _ = _reference(params.codebook.detach(), x, cfg.level_sizes, False, L)
    assert torch.equal(out.codes, codes_ref)
    p = out.histogram / out.histogram.sum(-1, keepdim=True)
    ref = torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum(-1)).mean()
    torch.testing.assert_close(out.perplexity, ref)
    # Gradients reach the selected codes only, never the padding.
    (z_q.sum() + out.loss).backward()
    grad = params.codebook.grad
    assert grad is not None
    for level, k in enumerate(cfg.level_sizes):
        assert float(grad[level, k:].abs().sum()) == 0.0
        assert float(grad[level, :k].abs().sum()) > 0.0


def test_per_level_sizes_warm_up_and_replacement_leave_the_padding_alone() -> None:
    cfg, params = _setup("per_level", replace_freq=1)
    x = 2 * torch.randn(300, 3, generator=_gen(3))
    warm = vqfunc.residual.warmup_params(params, x, cfg, method="kmeans", generator=_gen(4))
    for level, k in enumerate(cfg.level_sizes):
        assert float(warm.codebook[level, k:].abs().sum()) == 0.0
        assert bool(torch.isfinite(warm.codebook[level, :k]).all())
    assert len(torch.unique(warm.codebook[0], dim=0)) == 16
    # Far-away codes are dead after one step: all real ones are replaced, no padding row.
    far = params._replace(codebook=params.codebook + 1e3)
    state = vqfunc.residual.init_state(far, cfg)
    _, out = vqfunc.residual.quantize(far, x, cfg)
    new, new_state = vqfunc.residual.update_state(far, state, out, cfg, generator=_gen(5))
    for level, k in enumerate(cfg.level_sizes):
        assert torch.equal(new.codebook[level, k:], far.codebook[level, k:])
        assert bool((new.codebook[level, :k] != far.codebook[level, :k]).any())
    assert new_state.replace.counters.shape == (L, 16)


def test_fewer_levels_in_update_state_leave_the_levels_that_did_not_run() -> None:
    cfg, params = _setup("separate", replace_freq=2)
    x = torch.randn(64, 3, generator=_gen(6))
    state = vqfunc.residual.init_state(params, cfg)
    far = params._replace(codebook=params.codebook + 1e3)  # every code dead
    far_next = far
    for _ in range(2):
        _, out = vqfunc.residual.quantize(far, x, cfg, n_levels=2)
        far_next, state = vqfunc.residual.update_state(far, state, out, cfg, generator=_gen(7))
    assert torch.equal(far_next.codebook[2:], far.codebook[2:])
    assert torch.equal(state.replace.counters[2:], torch.full((2, 16), 2))
    assert bool((far_next.codebook[:2] != far.codebook[:2]).any())


def test_depth_masks_the_levels_of_each_row() -> None:
    cfg, params = _setup("separate")
    x = 2 * torch.randn(6, 5, 3, generator=_gen(8))
    depth = torch.tensor([1, 2, 3, 4, 4, 2]).view(6, 1)
    z_q, out = vqfunc.residual.quantize(params, x, cfg, depth=depth)
    _, full = vqfunc.residual.quantize(params, x, cfg)
    assert torch.equal(out.codes, full.codes)  # every level is searched
    assert torch.equal(out.depth, depth.expand(6, 5))
    for i, d in enumerate(depth.flatten().tolist()):
        ref = vqfunc.residual.dequantize(params, full.codes[i], cfg, n_levels=d)
        torch.testing.assert_close(z_q[i], ref, rtol=0, atol=1e-6)
    # Histogram: the dropped levels of a row are not counted.
    kept = torch.arange(L) < depth.view(6, 1, 1)
    for level in range(L):
        codes = full.codes[..., level][kept[..., level].expand(6, 5)]
        assert torch.equal(out.histogram[level], torch.bincount(codes, minlength=16).float())
    mse = (x.double() - z_q.double()).pow(2).mean()
    torch.testing.assert_close(out.loss.double(), mse, rtol=1e-5, atol=0)


def test_depth_composes_with_grad() -> None:
    cfg, params = _setup("separate")
    x = torch.randn(8, 3, generator=_gen(9))
    depth = torch.tensor([1, 1, 1, 1, 2, 2, 2, 2])

    def loss(codebook: torch.Tensor) -> torch.Tensor:
        _, out = vqfunc.residual.quantize(params._replace(codebook=codebook), x, cfg, depth=depth)
        return out.loss

    grad = torch.func.grad(loss)(params.codebook)
    assert float(grad[:2].abs().sum()) > 0 and float(grad[2:].abs().sum()) == 0.0


def test_draw_dropout_per_batch_and_per_sample() -> None:
    batch = ResidualConfig(
        feature_size=3, num_codes=8, levels=L, quantizer_dropout=1.0, dropout_per="batch"
    )
    sample = batch.replace(quantizer_dropout=0.5, dropout_per="sample")
    draws = [vqfunc.residual.draw_dropout(batch, 10, generator=_gen(s)) for s in range(400)]
    assert all(bool((d == d[0]).all()) for d in draws)
    values = torch.stack([d[0] for d in draws])
    counts = torch.bincount(values, minlength=L + 1)[1:]
    assert counts.min() > 400 / L * 0.6  # every depth in [1, L] is drawn, near uniformly
    assert int(values.min()) == 1 and int(values.max()) == L
    d = vqfunc.residual.draw_dropout(sample, 9, generator=_gen(0))
    assert torch.equal(d[4:], torch.full((5,), L))  # floor(0.5 * 9) = 4 samples dropped
    samples = torch.stack(
        [vqfunc.residual.draw_dropout(sample, 9, generator=_gen(s))[:4] for s in range(100)]
    )
    assert len(torch.unique(samples)) == L
    off = batch.replace(quantizer_dropout=0.0)
    assert torch.equal(vqfunc.residual.draw_dropout(off, 3, generator=_gen(0)), torch.full((3,), L))
    assert int(vqfunc.residual.draw_dropout(batch, 3, n_levels=2, generator=_gen(1)).max()) <= 2


def test_draw_dropout_consumes_the_same_stream_whatever_the_batch_size() -> None:
    cfg = ResidualConfig(
        feature_size=3, num_codes=8, levels=8, quantizer_dropout=1.0, dropout_per="batch"
    )
    a, b = _gen(11), _gen(11)
    first = [int(vqfunc.residual.draw_dropout(cfg, 4, generator=a)[0]) for _ in range(20)]
    second = [int(vqfunc.residual.draw_dropout(cfg, 13, generator=b)[0]) for _ in range(20)]
    assert first == second and len(set(first)) > 1


EN_CODEC_24KHZ = {1.5: 2, 3.0: 4, 6.0: 8, 12.0: 16, 24.0: 32}  # kbit/s -> levels, 75 Hz
EN_CODEC_48KHZ = {3.0: 2, 6.0: 4, 12.0: 8, 24.0: 16}  # kbit/s -> levels, 150 Hz


def test_bitrate_matches_encodec() -> None:
    cfg = ResidualConfig(feature_size=128, num_codes=1024 * 32, levels=32, share=False)
    assert vqfunc.residual.bitrate(cfg, 75, n_levels=1) == 750.0
    for kbps, n in EN_CODEC_24KHZ.items():
        assert vqfunc.residual.bitrate(cfg, 75.0, n_levels=n) == kbps * 1000
    cfg48 = cfg.replace(num_codes=1024 * 16, levels=16)
    for kbps, n in EN_CODEC_48KHZ.items():
        assert vqfunc.residual.bitrate(cfg48, 150, n_levels=n) == kbps * 1000
    sizes = ResidualConfig(feature_size=8, num_codes=(1024, 512, 256), levels=3, share=False)
    assert vqfunc.residual.bitrate(sizes, 75) == 75 * (10 + 9 + 8)
    shared = ResidualConfig(feature_size=8, num_codes=300, levels=2)
    assert math.isclose(vqfunc.residual.bitrate(shared, 50), 100 * math.log2(300))


def test_bad_arguments_name_the_argument_and_the_value() -> None:
    cfg, params = _setup("per_level")
    x = torch.randn(4, 3)
    for bad in (0, L + 1, True, 1.5, "2"):
        with pytest.raises(
            ValueError, match=rf"n_levels must be None or an int in \[1, {L}\].*{bad!r}"
        ):
            vqfunc.residual.quantize(params, x, cfg, n_levels=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="n_levels"):
            vqfunc.residual.dequantize(
                params, torch.zeros(4, L, dtype=torch.long), cfg, n_levels=bad
            )  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="n_levels"):
            vqfunc.residual.bitrate(cfg, 75, n_levels=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"trailing axis of size n_levels=2 or levels=4"):
        vqfunc.residual.dequantize(params, torch.zeros(4, 3, dtype=torch.long), cfg, n_levels=2)
    codes = torch.zeros(4, L, dtype=torch.long)
    codes[0, 3] = 2  # level 3 has 2 codes
    with pytest.raises(IndexError, match=r"level 3.*holds 2, outside \[0, 2\)"):
        vqfunc.residual.dequantize(params, codes, cfg)
    with pytest.raises(ValueError, match=r"depth holds 5; expected depths in \[1, 4\]"):
        vqfunc.residual.quantize(params, x, cfg, depth=torch.tensor([1, 2, 5, 1]))
    with pytest.raises(ValueError, match=r"depth holds 3; expected depths in \[1, 2\]"):
        vqfunc.residual.quantize(params, x, cfg, n_levels=2, depth=torch.tensor(3))
    with pytest.raises(ValueError, match=r"depth has shape \(3,\).*\(4,\)"):
        vqfunc.residual.quantize(params, x, cfg, depth=torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="depth must be an integer tensor"):
        vqfunc.residual.quantize(params, x, cfg, depth=torch.ones(4))
    with pytest.raises(
        ValueError, match=r"gives 3 codebook sizes, expected one per level \(levels=4\)"
    ):
        ResidualConfig(feature_size=3, num_codes=(4, 4, 4), levels=4, share=False)
    with pytest.raises(ValueError, match="needs share=False"):
        ResidualConfig(feature_size=3, num_codes=(4, 4), levels=2)
    with pytest.raises(ValueError, match=r"tuple of positive ints.*\(4, 0\)"):
        ResidualConfig(feature_size=3, num_codes=(4, 0), levels=2, share=False)
    with pytest.raises(ValueError, match="affine_groups=2 needs equal codebook sizes"):
        ResidualConfig(feature_size=3, num_codes=(4, 2), levels=2, share=False, affine_groups=2)
    with pytest.raises(ValueError, match="frame_rate must be a finite number > 0, got 0"):
        vqfunc.residual.bitrate(cfg, 0)
    with pytest.raises(ValueError, match="quantizer_dropout must be in"):
        ResidualConfig(feature_size=3, num_codes=4, quantizer_dropout=1.5)
    with pytest.raises(ValueError, match="dropout_per must be one of"):
        ResidualConfig(feature_size=3, num_codes=4, dropout_per="frame")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_samples must be an int >= 0"):
        vqfunc.residual.draw_dropout(cfg, -1)


def test_fewer_levels_and_depth_compose_with_vmap_over_param_stacks() -> None:
    cfg, _ = _setup("per_level")
    stack = [vqfunc.residual.init_params(cfg, generator=_gen(s)) for s in range(3)]
    params = vqfunc.VQParams(*(torch.stack(t) for t in zip(*stack, strict=True)))
    x = torch.randn(10, 3, generator=_gen(12))
    depth = torch.tensor([1, 2, 3, 3, 1, 2, 3, 3, 1, 2])

    def encode(p: vqfunc.VQParams) -> tuple[torch.Tensor, torch.Tensor]:
        z_q, out = vqfunc.residual.quantize(p, x, cfg, n_levels=3, depth=depth)
        return z_q, out.codes

    z_q, codes = torch.func.vmap(encode)(params)
    for i, p in enumerate(stack):
        ref_z, ref_codes = encode(p)
        assert torch.equal(codes[i], ref_codes)
        torch.testing.assert_close(z_q[i], ref_z)
