"""Exponential-moving-average codebook updates (van den Oord et al., 2017; Sonnet's VQ-EMA).

With decay `g = cfg.ema_decay`, batch counts `n_k` and batch sums `s_k = sum_{q_i = k} z_i`:

    N_k <- g N_k + (1 - g) n_k
    m_k <- g m_k + (1 - g) s_k
    N'_k = (N_k + eps) / (sum_j N_j + K eps) * sum_j N_j      (Laplace smoothing, eps = cfg.ema_eps)
    C_k  = m_k / N'_k

The averages live in the space the search sees: the effective codebook after the affine map,
and, for `dist="cosine"`, the l2-normalised inputs (the code is the mean of its unit inputs; the
search normalises it, so only its direction matters). The raw codebook is set to
`invert_affine` of `C`.

The statistics start as one pseudo-observation of each current code (`N_k = 1`,
`m_k = C_k`), so the first update is finite and moves used codes toward their inputs.

With EMA on, the codebook is moved by these averages only: the layer shim turns off its
gradient (`requires_grad=False`), and a functional training step should not apply an optimizer
update to `params.codebook` either (the commitment loss still trains the encoder).

Masked rows count neither in `n_k` nor in `s_k`. Under data parallelism, all-reduce (sum) the
`EMAStatistics` of every replica before `ema_update`.

The same functions serve plain, grouped and residual VQ (`vqfunc.VQConfig` and
`vqfunc.residual.ResidualConfig` both declare `ema_decay` and `ema_eps`): a residual level's
codebook averages the residuals that level searched. This is EnCodec's update term for term
(its `cluster_size`, `embed_avg` and `laplace_smoothing`); only the start differs, EnCodec's
sizes starting at 0 (or at the k-means cluster sizes) where these start at one
pseudo-observation per code.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from vqfunc._affine import effective_codebook, invert_affine
from vqfunc._books import as_books, book_vectors, from_books
from vqfunc._config import QuantizerConfig
from vqfunc._params import VQParams
from vqfunc._search import search_dtype


class EMAState(NamedTuple):
    """Running statistics of the EMA codebook.

    Attributes:
        counts: `[num_books, K]` running cluster sizes `N_k`.
        sums: `[num_books, K, d]` running sums `m_k` of the vectors assigned to each code.
            Both are empty along `K` (`[num_books, 0]`, `[num_books, 0, d]`) when
            `cfg.ema_decay == 0`.
    """

    counts: Tensor
    sums: Tensor


class EMAStatistics(NamedTuple):
    """One batch's statistics: `counts` `[num_books, K]` (`n_k`), `sums` `[num_books, K, d]`."""

    counts: Tensor
    sums: Tensor


def ema_settings(cfg: QuantizerConfig) -> tuple[float, float]:
    """`(ema_decay, ema_eps)` of `cfg`; a configuration without EMA fields has decay 0 (off)."""
    return float(getattr(cfg, "ema_decay", 0.0)), float(getattr(cfg, "ema_eps", 0.0))


def init_ema_state(params: VQParams, cfg: QuantizerConfig) -> EMAState:
    """Statistics of one pseudo-observation per code: `N_k = 1`, `m_k = C_k` (effective).

    Use it again after overwriting the codebook (e.g. after a warm-up), so that the averages
    start from the new codes. Stored in at least float32.
    """
    books, k, d = cfg.layout.num_books, cfg.layout.codes_per_book, cfg.layout.code_dim
    dtype = search_dtype(params.codebook.dtype)
    device = params.codebook.device
    if ema_settings(cfg)[0] <= 0:
        return EMAState(
            torch.zeros(books, 0, device=device, dtype=dtype),
            torch.zeros(books, 0, d, device=device, dtype=dtype),
        )
    effective = as_books(effective_codebook(params, cfg).detach(), cfg).to(dtype)
    return EMAState(torch.ones(books, k, device=device, dtype=dtype), effective.clone())


def ema_statistics(
    z: Tensor, codes: Tensor, cfg: QuantizerConfig, *, mask: Tensor | None = None
) -> EMAStatistics:
    """Batch counts and sums per code.

    Args:
        z: `[*B, F]` the searched vectors, `QuantizeOutput.z`.
        codes: `[*B]` (or `[*B, G]`) their codes, `QuantizeOutput.codes`.
        cfg: the static configuration.
        mask: optional `[*B]` mask (bool or float weights; masked rows do not count), or
            `[*B, G]` weights per row and part.

    Returns:
        `EMAStatistics` in `z`'s dtype (at least float32).
    """
    z = z.detach()
    z = z.to(search_dtype(z.dtype))
    books = book_vectors(z, codes, cfg, mask)
    num_books, _, d = books.vectors.shape
    k = cfg.layout.codes_per_book
    counts = books.weights.new_zeros(num_books, k).scatter_add(1, books.codes, books.weights)
    weighted = books.vectors * books.weights.unsqueeze(-1)
    index = books.codes.unsqueeze(-1).expand(weighted.shape)
    sums = weighted.new_zeros(num_books, k, d).scatter_add(1, index, weighted)
    return EMAStatistics(counts, sums)


def smoothed_counts(counts: Tensor, eps: float) -> Tensor:
    """Laplace-smoothed cluster sizes `N'_k = (N_k + eps) / (sum N + K eps) * sum N`."""
    total = counts.sum(-1, keepdim=True)
    k = counts.shape[-1]
    return (counts + eps) / (total + k * eps) * total


def ema_update(
    params: VQParams, state: EMAState, stats: EMAStatistics, cfg: QuantizerConfig
) -> tuple[VQParams, EMAState]:
    """One EMA step: new running statistics and the codebook `C_k = m_k / N'_k`.

    Args:
        params: current params (only the codebook changes).
        state: running statistics, from `init_ema_state` or a previous step.
        stats: this batch's `ema_statistics` (all-reduced under data parallelism).
        cfg: the static configuration (`ema_decay > 0`).

    Returns:
        New params and statistics; every code is recomputed from its averages.
    """
    decay, eps = ema_settings(cfg)
    if decay <= 0:
        raise ValueError(
            f"ema_update: cfg.ema_decay is {decay}; expected a decay in (0, 1) (EMA is off)"
        )
    expected = (cfg.layout.num_books, cfg.layout.codes_per_book)
    if tuple(state.counts.shape) != expected or tuple(stats.counts.shape) != expected:
        raise ValueError(
            f"ema_update: state.counts has shape {tuple(state.counts.shape)} and stats.counts "
            f"{tuple(stats.counts.shape)}, expected {expected} (from init_ema_state(params, cfg))"
        )
    counts = decay * state.counts + (1.0 - decay) * stats.counts.to(state.counts.dtype)
    sums = decay * state.sums + (1.0 - decay) * stats.sums.to(state.sums.dtype)
    # Clamped so that an all-zero histogram (impossible from init_ema_state) cannot divide by 0.
    smoothed = smoothed_counts(counts, eps).clamp(min=torch.finfo(counts.dtype).tiny)
    effective = sums / smoothed.unsqueeze(-1)
    raw = invert_affine(from_books(effective, cfg), params, cfg)
    codebook = raw.to(params.codebook.dtype)
    return params._replace(codebook=codebook), EMAState(counts, sums)


def reset_codes(
    state: EMAState, params: VQParams, replaced: Tensor, cfg: QuantizerConfig
) -> EMAState:
    """Restart the statistics of the `replaced` codes (`[num_books, K]` bool) from `params`.

    A replaced code gets one pseudo-observation of its new effective value (`N_k = 1`,
    `m_k = C_k N'_k`), so that the next update starts from it.
    """
    effective = as_books(effective_codebook(params, cfg).detach(), cfg).to(state.sums.dtype)
    counts = torch.where(replaced, torch.ones_like(state.counts), state.counts)
    smoothed = smoothed_counts(counts, ema_settings(cfg)[1]).unsqueeze(-1)
    sums = torch.where(replaced.unsqueeze(-1), effective * smoothed, state.sums)
    return EMAState(counts, sums)
