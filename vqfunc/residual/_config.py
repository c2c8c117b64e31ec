"""`ResidualConfig`: the static description of a residual vector quantizer."""

from __future__ import annotations

import dataclasses

from vqfunc._config import CodebookLayout, QuantizerConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResidualConfig(QuantizerConfig):
    """Static configuration of a residual vector quantizer.

    Takes the fields of `vqfunc.QuantizerConfig` (`feature_size`, `num_codes`, `dim`, `share`,
    `beta`, `affine_lr`, `affine_groups`, `sync_nu`, `estimator`, `replace_freq`,
    `replace_rho`, `replace_rule`, `replace_threshold`, `replace_usage`, `replace_decay`,
    `kmeans_init`) with these meanings for residual VQ: every code has
    `feature_size` entries (levels do not split the vector); with `share=False`, `num_codes`
    counts the codes of all levels together, each level's codebook holding
    `num_codes // levels`; the loss, the estimator and the synchronized update act on the sum
    of the levels; replacement draws from the residuals the levels searched.

    Args:
        levels: number of residual levels `L` (vqtorch calls it `groups`).
        ema_decay: decay `gamma` of EMA codebook updates, each level's codebook on the
            residuals that level searched (EnCodec's and SoundStream's update); 0 turns them
            off. With a shared codebook the residuals of all levels pool into one average.
        ema_eps: Laplace smoothing `eps` of the EMA cluster sizes.
    """

    levels: int = 1
    ema_decay: float = 0.0
    ema_eps: float = 1e-5

    _PARTS = "levels"

    def __post_init__(self) -> None:
        self._check()
        self._positive_int("levels")
        self._check_layout()
        self._in_range("ema_decay", 0.0, 1.0, high_open=True)
        self._non_negative("ema_eps")

    @property
    def layout(self) -> CodebookLayout:
        """One part per level, codes of `feature_size`."""
        return CodebookLayout(
            parts=self.levels,
            share=self.share,
            num_codes=self.num_codes,
            code_dim=self.feature_size,
            affine_groups=self.affine_groups,
            affine=self.affine_lr > 0,
        )
