"""`ResidualConfig`: the static description of a residual vector quantizer."""

from __future__ import annotations

import dataclasses
from typing import Literal

from vqfunc._config import _DISTS, CodebookLayout, Dist, QuantizerConfig, _is_int

DropoutPer = Literal["batch", "sample"]

_DROPOUT_PER = ("batch", "sample")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResidualConfig(QuantizerConfig):
    """Static configuration of a residual vector quantizer.

    Takes the fields of `vqfunc.QuantizerConfig` (`feature_size`, `num_codes`, `dim`, `share`,
    `beta`, `affine_lr`, `affine_groups`, `sync_nu`, `estimator`, `replace_freq`,
    `replace_rho`, `replace_rule`, `replace_threshold`, `replace_usage`, `replace_decay`,
    `kmeans_init`) with these meanings for residual VQ: every code has
    `feature_size` entries (levels do not split the vector); with `share=False`, an int
    `num_codes` counts the codes of all levels together, each level's codebook holding
    `num_codes // levels`; the loss, the estimator and the synchronized update act on the sum
    of the levels; replacement draws from the residuals the levels searched.

    `num_codes` may also be a tuple of one size per level, `(1024, 512, 256)` (needs
    `share=False` and `len(num_codes) == levels`): level `i` has `num_codes[i]` codes. The
    codebooks are then stored padded to the largest size, `[L, max(num_codes), F]`; the padding
    rows are never searched, selected, counted or replaced (`cfg.level_sizes` gives the sizes).

    Args:
        levels: number of residual levels `L` (vqtorch calls it `groups`).
        ema_decay: decay `gamma` of EMA codebook updates, each level's codebook on the
            residuals that level searched (EnCodec's and SoundStream's update); 0 turns them
            off. With a shared codebook the residuals of all levels pool into one average.
        ema_eps: Laplace smoothing `eps` of the EMA cluster sizes.
        quantizer_dropout: probability `p` of quantizer dropout in training (0 turns it off):
            the output sums only the first `depth` levels, `depth` uniform in `[1, L]`. See
            `dropout_per`.
        dropout_per: `"batch"` (EnCodec's: with probability `p` one random depth for the whole
            batch, else all levels) or `"sample"` (DAC's: the first `floor(p * S)` of the `S`
            samples of the batch each take a random depth, the others all levels).
        codebook_dim: size `d` of low-dimensional codes (None: codes of `feature_size`). Each
            level then has learned projections, `[F, d]` in and `[d, F]` out, both with a bias,
            in the params (`ResidualParams`): the level searches `e = r @ W_in + b_in`, and adds
            `(e + sg(c - e)) @ W_out + b_out` for its code `c` (straight-through per level, so
            the gradient reaches both projections, the input and, through the loss, the codes);
            the loss is the sum over levels of the commitment loss between `e` and `c`.
        dist: `"euclidean"` or `"cosine"`; cosine (which needs `codebook_dim`) searches with
            l2-normalised `e` and codes, and adds the raw code: DAC's factorised lookup. Without
            projections a unit code could not follow the residual's scale, so cosine needs them.
        channel_groups: grouped residual VQ (HiFi-Codec's): the feature axis splits into
            `G = channel_groups` groups of `feature_size // G` consecutive channels, each
            quantized by a residual stack of its own (`levels` levels, its own codebooks and
            projections; `num_codes` and `codebook_dim` are per group). Every param and state
            tensor then has a leading group axis `G`, the codes are `[*B, G, n]`; `n_levels`,
            `depth` and the mask apply to all groups alike. 1 (the default): one stack over
            all channels, every shape as without groups. See `group_config`.
    """

    levels: int = 1
    ema_decay: float = 0.0
    ema_eps: float = 1e-5
    quantizer_dropout: float = 0.0
    dropout_per: DropoutPer = "sample"
    codebook_dim: int | None = None
    dist: Dist = "euclidean"
    channel_groups: int = 1

    _PARTS = "levels"

    def __post_init__(self) -> None:
        if isinstance(self.num_codes, list):
            object.__setattr__(self, "num_codes", tuple(self.num_codes))
        self._check()
        self._positive_int("levels")
        self._check_channel_groups()
        self._check_layout()
        self._in_range("ema_decay", 0.0, 1.0, high_open=True)
        self._non_negative("ema_eps")
        self._in_range("quantizer_dropout", 0.0, 1.0)
        if self.dropout_per not in _DROPOUT_PER:
            raise ValueError(
                f"ResidualConfig: dropout_per must be one of {_DROPOUT_PER}, "
                f"got {self.dropout_per!r}"
            )
        self._check_projection()

    def _check_channel_groups(self) -> None:
        self._positive_int("channel_groups")
        if self.feature_size % self.channel_groups:
            raise ValueError(
                f"ResidualConfig: channel_groups={self.channel_groups} must divide "
                f"feature_size={self.feature_size} (each group quantizes "
                f"feature_size // channel_groups channels)"
            )

    @property
    def group_config(self) -> ResidualConfig:
        """The configuration of one group's residual stack: `channel_groups=1`,
        `feature_size // channel_groups` features on `dim=-1` (itself without groups)."""
        if self.channel_groups == 1:
            return self
        return dataclasses.replace(
            self, channel_groups=1, feature_size=self.feature_size // self.channel_groups, dim=-1
        )

    def _check_projection(self) -> None:
        if self.dist not in _DISTS:
            raise ValueError(f"ResidualConfig: dist must be one of {_DISTS}, got {self.dist!r}")
        if self.codebook_dim is None:
            if self.dist == "cosine":
                raise ValueError(
                    "ResidualConfig: dist='cosine' needs codebook_dim (unit codes cannot follow "
                    "the residual's scale without an output projection); got codebook_dim=None"
                )
            return
        self._positive_int("codebook_dim")
        if self.estimator != "ste" or self.sync_nu != 0:
            raise ValueError(
                f"ResidualConfig: codebook_dim={self.codebook_dim} runs a straight-through "
                f"estimator per level; it needs estimator='ste' and sync_nu=0, got "
                f"estimator={self.estimator!r}, sync_nu={self.sync_nu!r}"
            )

    def _check_num_codes(self) -> None:
        sizes = self.num_codes
        if not isinstance(sizes, tuple):
            self._positive_int("num_codes")
            return
        if not sizes or not all(_is_int(k) and k >= 1 for k in sizes):
            raise ValueError(
                f"ResidualConfig: num_codes must be a positive int or a tuple of positive ints "
                f"(one codebook size per level), got {sizes!r}"
            )

    def _check_layout(self) -> None:
        sizes = self.num_codes
        if not isinstance(sizes, tuple):
            super()._check_layout()
            return
        if len(sizes) != self.levels:
            raise ValueError(
                f"ResidualConfig: num_codes={sizes!r} gives {len(sizes)} codebook sizes, "
                f"expected one per level (levels={self.levels})"
            )
        if self.share:
            raise ValueError(
                f"ResidualConfig: num_codes={sizes!r} gives one size per level, which needs "
                "share=False (a shared codebook has one size)"
            )
        if self.affine_groups != 1 and len(set(sizes)) > 1:
            raise ValueError(
                f"ResidualConfig: affine_groups={self.affine_groups} needs equal codebook "
                f"sizes, got num_codes={sizes!r}; use affine_groups=1"
            )
        if max(sizes) % self.affine_groups:
            raise ValueError(
                f"ResidualConfig: affine_groups={self.affine_groups} must divide the "
                f"{max(sizes)} codes of each codebook"
            )

    @property
    def level_sizes(self) -> tuple[int, ...]:
        """The number of codes `K_i` that level `i` searches, one per level."""
        if isinstance(self.num_codes, tuple):
            return self.num_codes
        return (self.codes_per_book,) * self.levels

    @property
    def layout(self) -> CodebookLayout:
        """One part per level, codes of `feature_size` (per-level sizes stored padded).

        With `channel_groups > 1` the layout of one group (codes of
        `feature_size // channel_groups`); the params stack `channel_groups` of them."""
        if self.channel_groups > 1:
            return self.group_config.layout
        sizes = self.num_codes
        stored = self.levels * max(sizes) if isinstance(sizes, tuple) else sizes
        return CodebookLayout(
            parts=self.levels,
            share=self.share,
            num_codes=stored,
            code_dim=self.feature_size if self.codebook_dim is None else self.codebook_dim,
            affine_groups=self.affine_groups,
            affine=self.affine_lr > 0,
        )

    @property
    def projection_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shapes of `ResidualParams`' projections (empty without `codebook_dim`), with the
        leading group axis when `channel_groups > 1`."""
        if self.codebook_dim is None:
            return {}
        if self.channel_groups > 1:
            shapes = self.group_config.projection_shapes
            return {name: (self.channel_groups, *shape) for name, shape in shapes.items()}
        f, d, n = self.feature_size, self.codebook_dim, self.levels
        return {
            "proj_in": (n, f, d),
            "proj_in_bias": (n, d),
            "proj_out": (n, d, f),
            "proj_out_bias": (n, f),
        }

    def describe(self) -> str:
        """The fields that decide the params' shapes, as `name=value` pairs (for messages)."""
        text = super().describe()
        if self.channel_groups > 1:
            text += f", channel_groups={self.channel_groups}"
        return text

    @property
    def codebook_shape(self) -> tuple[int, ...]:
        """Shape of `params.codebook`: `layout.codebook_shape`, with the leading group axis
        when `channel_groups > 1`."""
        shape = self.layout.codebook_shape
        return shape if self.channel_groups == 1 else (self.channel_groups, *shape)

    def check_n_levels(self, n_levels: object, *, where: str) -> int:
        """`n_levels` as an int in `[1, levels]` (None: all levels); a clear error otherwise."""
        if n_levels is None:
            return self.levels
        if not _is_int(n_levels) or not 1 <= n_levels <= self.levels:  # type: ignore[operator]
            raise ValueError(
                f"{where}: n_levels must be None or an int in [1, {self.levels}] "
                f"(levels={self.levels}), got {n_levels!r}"
            )
        return int(n_levels)  # type: ignore[call-overload]
