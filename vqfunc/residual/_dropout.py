"""Quantizer dropout: a random number of levels per batch (EnCodec) or per sample (DAC).

Training a residual quantizer with a random depth makes every prefix of the levels a usable
codec (one model, several bitrates). The depth is drawn here, outside the quantizer, and
passed to `vqfunc.residual.quantize(..., depth=)`: the quantizer itself draws nothing, so it
runs under `torch.compile(fullgraph=True)` with the depth as an ordinary input tensor (no
recompiles across steps, whatever the depth).

Every draw consumes the same amount of the generator's stream (one 62-bit sub-seed), whatever
the batch size: replicas whose generators start from the same seed draw the same depths step
after step, even with local batches of different sizes (`dropout_per="batch"`: the same depth
on every replica).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vqfunc._validate import check_config
from vqfunc.residual._config import ResidualConfig


def draw_dropout(
    cfg: ResidualConfig,
    num_samples: int,
    *,
    n_levels: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """The depth (levels in the output) of each sample of a training batch.

    With `p = cfg.quantizer_dropout` and `n` levels (`n_levels`, default `cfg.levels`):

    - `dropout_per="batch"` (EnCodec): with probability `p`, one depth uniform in `[1, n]` for
      every sample; otherwise `n` (EnCodec's training draws a depth on every batch: `p = 1`);
    - `dropout_per="sample"` (DAC): the first `floor(p * num_samples)` samples each take a depth
      uniform in `[1, n]`, the others `n`.

    With `p = 0` every depth is `n`.

    Args:
        cfg: the static configuration.
        num_samples: the size `S` of the batch's sample axis (the first axis of the input
            without its feature axis; every vector of a sample shares its depth).
        n_levels: the levels that run (as given to `quantize`); None: all.
        generator: a CPU generator (None: torch's default one).
        device: where to put the result.

    Returns:
        `[S]` int64 depths in `[1, n]`; reshape to `[S, 1, ...]` to broadcast over the other
        batch axes, and pass as `quantize(..., depth=)`.
    """
    where = "vqfunc.residual.draw_dropout"
    check_config(cfg, ResidualConfig, where=where)
    n = cfg.check_n_levels(n_levels, where=where)
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 0:
        raise ValueError(f"{where}: num_samples must be an int >= 0, got {num_samples!r}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"{where}: generator must be a CPU generator, got {generator.device}")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    sub = torch.Generator().manual_seed(seed)
    depth = torch.full((num_samples,), n, dtype=torch.long)
    p = cfg.quantizer_dropout
    if p > 0:
        if cfg.dropout_per == "batch":
            drops = bool(torch.rand((), generator=sub) < p)
            level = torch.randint(1, n + 1, (), generator=sub)
            if drops:
                depth.fill_(int(level))
        else:
            dropped = int(p * num_samples)
            depth[:dropped] = torch.randint(1, n + 1, (dropped,), generator=sub)
    return depth.to(device)
