"""Gradient estimators: how the gradient of the task loss crosses the quantizer.

All of them return the selected codes `z_q` in the forward pass; they differ in the gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vqfunc._config import QuantizerConfig

_EPS = 1e-12


def straight_through(z: Tensor, z_q: Tensor) -> Tensor:
    """`z + sg(z_q - z)`: value `z_q`, gradient to `z` the identity.

    Written as `sg(z_q) + (z - sg(z))`, which has the same gradient and whose value is
    exactly `z_q` (`z + (z_q - z)` can be off by a rounding step).
    """
    return z_q.detach() + _zero_with_gradient_of(z)


def _zero_with_gradient_of(t: Tensor) -> Tensor:
    """`t - sg(t)`: exactly zero in value (for finite `t`), the gradient of `t`."""
    return t - t.detach()


def rotation_trick(z: Tensor, z_q: Tensor) -> Tensor:
    """The rotation trick (Fifty et al., 2024) over the last axis.

    Value `z_q`; the gradient reaches `z` through `sg(lambda * R)`, where `R` is the rotation
    that takes the direction of `z` onto the direction of `z_q` and `lambda = ||z_q|| / ||z||`.
    With `u = z / ||z||`, `q = z_q / ||z_q||`, `w = (u + q) / ||u + q||`:
    `R = I - 2 w w^T + 2 q u^T`.

    Where `z` is (numerically) zero its direction is undefined and `lambda` unbounded; there
    the gradient falls back to the straight-through identity (`R = I`, `lambda = 1`).
    """
    with torch.no_grad():
        raw_norm = z.norm(dim=-1, keepdim=True)
        defined = (raw_norm > _EPS).to(z.dtype)
        z_norm = raw_norm.clamp_min(_EPS)
        q_norm = z_q.norm(dim=-1, keepdim=True).clamp_min(_EPS)
        u = z / z_norm * defined
        q = z_q / q_norm
        w = u + q
        w = w / w.norm(dim=-1, keepdim=True).clamp_min(_EPS) * defined
        scale = torch.where(defined > 0, q_norm / z_norm, torch.ones_like(z_norm))
    dot = lambda a, b: (a * b).sum(-1, keepdim=True)  # noqa: E731
    rotated = scale * (z - 2.0 * w * dot(w, z) + 2.0 * q * dot(u, z))
    # Value exactly `z_q`, even where the rotation is degenerate (z = 0) or rounds.
    return z_q.detach() + _zero_with_gradient_of(rotated)


def synchronized(z_st: Tensor, z_q: Tensor, nu: float) -> Tensor:
    """`z_st + nu * z_q - sg(nu * z_q)`: same value, each used code gets `nu` x the gradient.

    The added term is exactly zero in value, so the output equals `z_st` bit for bit.
    """
    return z_st + _zero_with_gradient_of(nu * z_q)


def estimate(z: Tensor, z_q: Tensor, cfg: QuantizerConfig) -> Tensor:
    """The quantizer's output for inputs `z` and codes `z_q`, as chosen by `cfg`."""
    out = rotation_trick(z, z_q) if cfg.estimator == "rotation" else straight_through(z, z_q)
    if cfg.sync_nu > 0:
        out = synchronized(out, z_q, cfg.sync_nu)
    return out
