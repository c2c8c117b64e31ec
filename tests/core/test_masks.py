"""Masks in the layer: masked positions count in no loss, statistic, counter or candidate."""

from __future__ import annotations

import torch

import vqfunc


def _pair(**kw: object) -> tuple[vqfunc.VectorQuantize, vqfunc.VectorQuantize]:
    a = vqfunc.VectorQuantize(4, 6, generator=torch.Generator().manual_seed(0), **kw)
    b = vqfunc.VectorQuantize(4, 6, generator=torch.Generator().manual_seed(0), **kw)
    return a, b


def test_masked_layer_steps_equal_steps_on_the_kept_positions() -> None:
    """Same loss, EMA statistics, codebook and counters as a batch without the masked rows."""
    masked, kept = _pair(ema_decay=0.8, replace_freq=4)  # counting, no replacement yet
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(3, 4, 5, generator=g)  # [B, F, L]: features on dim 1
        mask = torch.rand(3, 5, generator=g) > 0.4
        x_garbage = torch.where(mask.unsqueeze(1), x, torch.full_like(x, 1e3))
        _, misc_m = masked(x_garbage, mask=mask)
        _, misc_k = kept(x.movedim(1, -1)[mask])  # [N, F]: the kept vectors only
        torch.testing.assert_close(misc_m["loss"], misc_k["loss"])
        torch.testing.assert_close(misc_m["histogram"], misc_k["histogram"])
    for name in ("codebook", "ema_counts", "ema_sums", "replace_counters"):
        torch.testing.assert_close(masked.state_dict()[name], kept.state_dict()[name])


def test_fully_masked_batch_changes_no_statistic() -> None:
    layer, _ = _pair(ema_decay=0.8)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer(torch.randn(2, 4, 3), mask=torch.zeros(2, 3, dtype=torch.bool))
    # Only the decay acts: the counts shrink, the sums shrink alike, the codes stay.
    torch.testing.assert_close(layer.ema_counts, 0.8 * before["ema_counts"])
    torch.testing.assert_close(layer.codebook.detach(), before["codebook"], rtol=1e-4, atol=1e-5)
