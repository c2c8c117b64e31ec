"""`bitrate`: the bits per second a residual quantizer's codes take."""

from __future__ import annotations

import math

from vqfunc._validate import check_config
from vqfunc.residual._config import ResidualConfig


def bitrate(cfg: ResidualConfig, frame_rate: float, n_levels: int | None = None) -> float:
    """`frame_rate * G * sum_i log2(K_i)` over the first `n_levels` levels, in bit/s
    (`G = cfg.channel_groups`: every group spends its own codes on every frame).

    A level with `K_i` codes spends `log2(K_i)` bits on every frame (one code per vector):
    EnCodec's 24 kHz model (1024 codes, 75 frames per second) spends 750 bit/s per level,
    1.5 kbit/s with 2 levels and 24 kbit/s with 32.

    Args:
        cfg: the static configuration (its `level_sizes`).
        frame_rate: vectors quantized per second (e.g. the sample rate over the encoder's
            hop), a finite number > 0.
        n_levels: the levels that run (as given to `quantize`); None: all.

    Returns:
        Bits per second, a Python float.
    """
    where = "vqfunc.residual.bitrate"
    check_config(cfg, ResidualConfig, where=where)
    n = cfg.check_n_levels(n_levels, where=where)
    rate_ok = isinstance(frame_rate, (int, float)) and not isinstance(frame_rate, bool)
    if not rate_ok or not (math.isfinite(frame_rate) and frame_rate > 0):
        raise ValueError(f"{where}: frame_rate must be a finite number > 0, got {frame_rate!r}")
    per_group = sum(math.log2(k) for k in cfg.level_sizes[:n])
    return frame_rate * cfg.channel_groups * per_group
