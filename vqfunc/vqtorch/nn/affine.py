"""`vqtorch.nn.affine`: the affine re-parameterisation of a codebook (Huh et al., 2023).

`AffineTransform(codebook)` maps every code `c` of `[n, c]` codes to `scale * c + bias`, with
the `n` codes split into `num_groups` consecutive blocks that each have their own scale and
bias. Two modes:

- learned (the default, what vqtorch's layers build): `scale = 1 + lr_scale * s`,
  `bias = lr_scale * b` with parameters `s`, `b` (`self.scale`, `self.bias`, `[num_groups, F]`)
  that start at 0;
- running statistics (`use_running_statistics=True`): scale and bias that move the codes'
  mean and variance onto those of the inputs, tracked as moving averages with `momentum`
  (`update_running_statistics`, called by the layer in training mode before each search).

The map itself is vqfunc's (`vqfunc._affine.apply_affine`, which `vqfunc.effective_codebook`
applies to a layer's codebook).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vqfunc._affine import apply_affine

__all__ = ["AffineTransform"]


class AffineTransform(nn.Module):
    """Per-block affine map of a codebook, learned or from running statistics.

    Args:
        feature_size: size of the scale and bias of each block (the code size, or 1 for one
            number per block).
        use_running_statistics: derive scale and bias from moving averages of the inputs' and
            the codes' mean and variance instead of learning them.
        momentum: weight of the new batch in the moving averages.
        lr_scale: learning-rate multiplier of the learned parameters.
        num_groups: consecutive blocks of codes, each with its own scale and bias.
    """

    running_statistics_initialized: Tensor
    running_ze_mean: Tensor
    running_ze_var: Tensor
    running_c_mean: Tensor
    running_c_var: Tensor

    def __init__(
        self,
        feature_size: int,
        use_running_statistics: bool = False,
        momentum: float = 0.1,
        lr_scale: float = 1,
        num_groups: int = 1,
    ) -> None:
        super().__init__()
        self.use_running_statistics = use_running_statistics
        self.num_groups = num_groups
        if use_running_statistics:
            self.momentum = momentum
            self.register_buffer("running_statistics_initialized", torch.zeros(1))
            for kind in ("ze", "c"):  # in vqtorch's order, so state_dict keys keep it
                self.register_buffer(f"running_{kind}_mean", torch.zeros(num_groups, feature_size))
                self.register_buffer(f"running_{kind}_var", torch.ones(num_groups, feature_size))
        else:
            self.scale = nn.Parameter(torch.zeros(num_groups, feature_size))
            self.bias = nn.Parameter(torch.zeros(num_groups, feature_size))
            self.lr_scale = lr_scale

    @torch.no_grad()
    def update_running_statistics(self, z_e: Tensor, c: Tensor) -> None:
        """In training mode with running statistics, fold the batch into the moving averages.

        Args:
            z_e: `[B, N, F]` the vectors being quantized.
            c: `[K, F]` the codes they are searched among.

        The first call copies the batch statistics (biased variances); later calls move the
        averages by `momentum` towards them. Otherwise a no-op.
        """
        if not (self.training and self.use_running_statistics):
            return
        batch = {
            "running_ze_mean": z_e.mean((0, 1)).unsqueeze(0),
            "running_ze_var": z_e.var((0, 1), unbiased=False).unsqueeze(0),
            "running_c_mean": c.mean(0).unsqueeze(0),
            "running_c_var": c.var(0, unbiased=False).unsqueeze(0),
        }
        if not bool(self.running_statistics_initialized):
            for name, value in batch.items():
                getattr(self, name).copy_(value)
            self.running_statistics_initialized.fill_(1)
            return
        m = self.momentum
        for name, value in batch.items():
            setattr(self, name, m * value + (1 - m) * getattr(self, name))

    def forward(self, codebook: Tensor) -> Tensor:
        """`[n, c]` codes -> their images, block by block (`n` a multiple of `num_groups`)."""
        n = codebook.shape[0]
        if n % self.num_groups:
            raise ValueError(
                f"AffineTransform: {n} codes do not split into num_groups={self.num_groups} "
                "equal blocks; expected a multiple of num_groups"
            )
        scale, bias = self.get_affine_params()
        return apply_affine(codebook, scale.squeeze(1), bias.squeeze(1))

    def get_affine_params(self) -> tuple[Tensor, Tensor]:
        """The effective `(scale, bias)`, each `[num_groups, 1, feature_size]`."""
        if self.use_running_statistics:
            scale = (self.running_ze_var / (self.running_c_var + 1e-8)).sqrt()
            bias = self.running_ze_mean - scale * self.running_c_mean
        else:
            scale = 1.0 + self.lr_scale * self.scale
            bias = self.lr_scale * self.bias
        return scale.unsqueeze(1), bias.unsqueeze(1)
