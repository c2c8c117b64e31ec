"""Parity with the `encodec` package's residual VQ (`encodec.quantization.core_vq`).

Its `ResidualVectorQuantization` holds one `EuclideanCodebook` per level; copied into a vqfunc
residual quantizer with separate codebooks (`share=False`, `dim=1` for its `[B, D, T]` input),
eval gives the same codes and quantized output, and one training step the same EMA statistics
(cluster sizes, sums, codebooks). Each step is also checked against a float64 computation
written here from the formulas.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from support.encodec_core import load_core_vq

import vqfunc
from vqfunc._ema import EMAState

RC = vqfunc.residual.ResidualConfig

core_vq = load_core_vq()
pytestmark = pytest.mark.skipif(core_vq is None, reason="needs the encodec package (test extra)")

DIM, K = 6, 16


def _reference(levels: int, *, decay: float = 0.9, threshold: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    ref: torch.nn.Module = core_vq.ResidualVectorQuantization(  # type: ignore[union-attr]
        num_quantizers=levels, dim=DIM, codebook_size=K, kmeans_init=False, decay=decay,
        threshold_ema_dead_code=threshold,
    )  # fmt: skip
    return ref


def _books(ref: torch.nn.Module, levels: int) -> list[Any]:
    return [layer._codebook for layer in list(ref.layers)[:levels]]  # type: ignore[union-attr]


def _vqfunc_copy(
    ref: torch.nn.Module, levels: int, **options: float
) -> tuple[vqfunc.residual.ResidualConfig, vqfunc.VQParams]:
    """A vqfunc config of `levels` levels holding the first `levels` codebooks of `ref`."""
    cfg = RC(feature_size=DIM, num_codes=levels * K, levels=levels, share=False, dim=1, **options)
    codebook = torch.stack([book.embed.detach().clone() for book in _books(ref, levels)])
    return cfg, vqfunc.residual.init_params(cfg)._replace(codebook=codebook)


@pytest.mark.parametrize("levels", range(1, 9))
def test_eval_codes_and_outputs_are_identical(levels: int) -> None:
    ref = _reference(levels).eval()
    x = torch.randn(3, DIM, 20, generator=torch.Generator().manual_seed(levels)) * 2
    with torch.no_grad():
        quantized, indices, _ = ref(x)
        encoded = ref.encode(x)
        decoded = ref.decode(encoded)
    cfg, params = _vqfunc_copy(ref, levels)
    z_q, out = vqfunc.residual.quantize(params, x, cfg)
    codes = out.codes.permute(2, 0, 1)  # encodec's [n_q, B, T]
    assert torch.equal(codes, indices)
    assert torch.equal(codes, encoded)
    # The same codes; the sums of their vectors agree to rounding (from 5 levels on, a vectorised
    # sum over the levels adds in another order than its running sum).
    torch.testing.assert_close(z_q, quantized, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(vqfunc.residual.dequantize(params, out.codes, cfg), decoded)


@pytest.mark.parametrize("n_q", [1, 3, 5])
def test_fewer_levels_match_its_n_q(n_q: int) -> None:
    ref = _reference(8).eval()
    x = torch.randn(2, DIM, 30, generator=torch.Generator().manual_seed(n_q))
    with torch.no_grad():
        quantized, indices, _ = ref(x, n_q=n_q)
        encoded = ref.encode(x, n_q=n_q)
        decoded = ref.decode(encoded)
    # The full 8-level copy, asked for n_q levels at quantize and at dequantize time.
    cfg, params = _vqfunc_copy(ref, 8)
    z_q, out = vqfunc.residual.quantize(params, x, cfg, n_levels=n_q)
    assert indices.shape[0] == n_q and out.codes.shape[-1] == n_q
    assert torch.equal(out.codes.permute(2, 0, 1), indices)
    assert torch.equal(out.codes.permute(2, 0, 1), encoded)
    torch.testing.assert_close(z_q, quantized, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        vqfunc.residual.dequantize(params, out.codes, cfg, n_levels=n_q), decoded
    )
    # Decoding the first n_q of the full codes gives the same.
    _, full = vqfunc.residual.quantize(params, x, cfg)
    torch.testing.assert_close(
        vqfunc.residual.dequantize(params, full.codes, cfg, n_levels=n_q), decoded
    )
    # And so does a config of n_q levels holding the first n_q codebooks.
    small_cfg, small = _vqfunc_copy(ref, n_q)
    assert torch.equal(vqfunc.residual.quantize(small, x, small_cfg)[1].codes, out.codes)


def _float64_ema_step(
    x: torch.Tensor, books: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor, decay: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """EnCodec's update in float64, level by level: codes from the pre-step codebooks."""
    residual = x.double().permute(0, 2, 1).reshape(-1, x.shape[1])
    new_counts, new_sums, new_books = [], [], []
    for level in range(books.shape[0]):
        book = books[level].double()
        codes = torch.cdist(residual, book).argmin(-1)
        onehot = torch.nn.functional.one_hot(codes, book.shape[0]).double()
        n = decay * counts[level].double() + (1 - decay) * onehot.sum(0)
        m = decay * sums[level].double() + (1 - decay) * onehot.T @ residual
        smoothed = (n + eps) / (n.sum() + book.shape[0] * eps) * n.sum()
        new_counts.append(n)
        new_sums.append(m)
        new_books.append(m / smoothed[:, None])
        residual = residual - book[codes]
    return torch.stack(new_counts), torch.stack(new_sums), torch.stack(new_books)


@pytest.mark.parametrize("levels", [1, 4])
@pytest.mark.parametrize("start", ["earlier run", "its own start"])
def test_one_training_step_gives_its_ema_statistics(levels: int, start: str) -> None:
    decay, eps = 0.9, 1e-5
    ref = _reference(levels, decay=decay).train()
    g = torch.Generator().manual_seed(1)
    if start == "earlier run":  # running statistics of an earlier run
        for book in _books(ref, levels):
            book.cluster_size.copy_(torch.rand(K, generator=g) * 5)
            book.embed_avg.copy_(torch.randn(K, DIM, generator=g) * 3)
    # Otherwise its own start: sizes 0 and sums equal to the codes.
    cfg, params = _vqfunc_copy(ref, levels, ema_decay=decay, ema_eps=eps)
    counts = torch.stack([book.cluster_size.clone() for book in _books(ref, levels)])
    sums = torch.stack([book.embed_avg.clone() for book in _books(ref, levels)])
    state = vqfunc.residual.init_state(params, cfg)._replace(ema=EMAState(counts, sums))
    x = torch.randn(4, DIM, 25, generator=g) * 2
    expected = _float64_ema_step(x, params.codebook, counts, sums, decay, eps)

    ref(x)
    _, out = vqfunc.residual.quantize(params, x, cfg)
    new_params, new_state = vqfunc.residual.update_state(params, state, out, cfg)

    theirs = [
        torch.stack([getattr(book, name) for book in _books(ref, levels)])
        for name in ("cluster_size", "embed_avg", "embed")
    ]
    ours = (new_state.ema.counts, new_state.ema.sums, new_params.codebook)
    for name, mine, their, exact in zip(
        ("sizes", "sums", "codebook"), ours, theirs, expected, strict=True
    ):
        torch.testing.assert_close(mine, their, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(mine.double(), exact, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("levels", [1, 3])
def test_its_dead_codes_and_their_batch_vectors_match_the_count_rule(levels: int) -> None:
    threshold = 2.0
    ref = _reference(levels, threshold=threshold).eval()
    g = torch.Generator().manual_seed(2)
    sizes = torch.rand(levels, K, generator=g) * 4  # EMA cluster sizes of an earlier run
    for book, size in zip(_books(ref, levels), sizes, strict=True):
        book.cluster_size.copy_(size)
    cfg, params = _vqfunc_copy(
        ref, levels, replace_rule="usage", replace_usage="count", replace_threshold=threshold,
        replace_rho=0.0,
    )  # fmt: skip
    state = vqfunc.residual.init_state(params, cfg)
    state = state._replace(replace=state.replace._replace(usage=sizes.clone()))
    x = torch.randn(2, DIM, 40, generator=g)
    _, out = vqfunc.residual.quantize(params, x, cfg)
    new_params, _ = vqfunc.residual.update_state(params, state, out, cfg, generator=g)

    dead = sizes.double() < threshold  # the rule, in float64
    assert dead.any() and (~dead).any()
    ours = (new_params.codebook != params.codebook).any(-1)
    assert torch.equal(ours, dead)
    for level, book in enumerate(_books(ref, levels)):
        # Its expiry on the same level's residuals (the vectors that level searched).
        samples = out.residuals[:, :, level].reshape(-1, DIM)
        before = book.embed.clone()
        torch.manual_seed(level)
        book.expire_codes_(samples)
        theirs = (book.embed != before).any(-1)
        assert torch.equal(theirs, dead[level])
        for new in (new_params.codebook[level][dead[level]], book.embed[dead[level]]):
            gap = (new[:, None] - samples[None]).norm(dim=-1).min(-1).values
            assert (gap < 1e-6).all()  # every replaced code is a vector of the batch


def test_its_training_step_recomputes_the_replaced_codes_from_the_averages() -> None:
    # encodec 0.1.1 replaces dead codes in `embed` only, then sets `embed` from its averages in
    # the same forward pass: the replacement leaves no trace. vqfunc restarts the averages of a
    # replaced code as well (see docs/restarts.md).
    ref = _reference(1, threshold=1e9).train()  # every code is dead
    book = _books(ref, 1)[0]
    g = torch.Generator().manual_seed(3)
    book.cluster_size.copy_(torch.rand(K, generator=g))
    x = torch.randn(2, DIM, 10, generator=g)
    ref(x)
    size = book.cluster_size
    smoothed = (size + 1e-5) / (size.sum() + K * 1e-5) * size.sum()
    torch.testing.assert_close(book.embed, book.embed_avg / smoothed[:, None])
    samples = x.permute(0, 2, 1).reshape(-1, DIM)
    assert ((book.embed[:, None] - samples[None]).norm(dim=-1).min(-1).values > 1e-3).all()
