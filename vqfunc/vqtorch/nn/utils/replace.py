"""`vqtorch.nn.utils.replace`: least-recently-used replacement of dead codes, as vqtorch runs it.

`lru_replacement(layer, rho, timeout)` (what `replace_freq=T` does with `rho=0.01`) gives the
layer a buffer `_counts` (one float per code, starting at `timeout`) and a forward hook. After
every training forward pass the hook counts down every code, puts the codes the batch used
(`misc["q"]`, global indices) back at `timeout`, and replaces each code that reaches 0: by
default (`policy="input_random"`) with a vector of the batch (`misc["z"]`, all groups' or the
residual layer's input vectors pooled, in a random order) plus `rho * ||v|| * noise`, written
to the raw codebook rows. The counting and the swap are vqfunc's
(`vqfunc._replace.count_down`, `replace_expired`, on the codebook as one flat book); the random
draws are vqtorch's, in vqtorch's order (`torch.randperm` on the CPU generator, then
`torch.randn_like`), so one seed gives vqtorch's codebook.

Unlike vqtorch, `rho=0` is accepted (no noise; `ReplaceLRU.apply`'s own default), a period of 1
is accepted, a disabled layer (`enabled=False`) is left alone, and `"input_kmeans"` runs on CPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vqfunc._config import VQConfig
from vqfunc._kmeans import kmeans
from vqfunc._metrics import code_histogram
from vqfunc._params import VQParams
from vqfunc._replace import Candidates, ReplaceState, count_down, replace_expired

__all__ = ["ReplaceLRU", "lru_replacement"]


class ReplaceLRU:
    """The forward hook of dead-code replacement.

    Attributes:
        rho: relative size of the noise added to the replacing vectors.
        timeout: steps a code may go unused before it is replaced.
        policy: where the new codes come from: `"input_random"` (vectors of the batch, the
            default), `"input_kmeans"` (k-means centroids of the batch) or `"self"` (copies of
            codes, drawn with probability growing with their use in the batch).
        tau: temperature of the `"self"` policy.
    """

    VALID_POLICIES = ["input_random", "input_kmeans", "self"]  # noqa: RUF012 (vqtorch's list)

    def __init__(self, rho: float = 1e-4, timeout: int = 100) -> None:
        if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 1:
            raise ValueError(f"ReplaceLRU: timeout must be an int >= 1, got {timeout!r}")
        if not isinstance(rho, (int, float)) or isinstance(rho, bool) or not rho >= 0:
            raise ValueError(f"ReplaceLRU: rho must be a number >= 0, got {rho!r}")
        self.rho = rho
        self.timeout = timeout
        self.policy = "input_random"
        self.tau = 2.0

    @staticmethod
    def apply(module: Any, rho: float = 0.0, timeout: int = 100) -> ReplaceLRU:
        """Register the hook on `module` and give it the buffer `_counts` (`[num_codes]`)."""
        fn = ReplaceLRU(rho, timeout)
        device = next(module.parameters()).device
        module.register_forward_hook(fn)
        module.register_buffer("_counts", timeout * torch.ones(module.num_codes, device=device))
        return fn

    def __call__(
        self, module: Any, inputs: tuple[Any, ...], outputs: tuple[Tensor, dict[str, Any]]
    ) -> tuple[Tensor, dict[str, Any]] | None:
        """One replacement step after a training forward pass of `module`."""
        if not module.training:
            return None
        misc = outputs[1]
        if not misc:  # a disabled layer returns an empty misc
            return outputs
        if self.policy not in self.VALID_POLICIES:
            raise ValueError(
                f"ReplaceLRU: unknown policy {self.policy!r}; expected one of {self.VALID_POLICIES}"
            )
        with torch.no_grad():
            self._step(module, misc)
        return outputs

    def _step(self, module: Any, misc: dict[str, Any]) -> None:
        weight: Tensor = module.codebook.weight
        rows, d = weight.shape
        counts: Tensor = module._counts
        # The codebook as one flat book of all rows, indexed by vqtorch's global codes.
        cfg = VQConfig(feature_size=d, num_codes=rows, dim=-1, replace_freq=self.timeout)
        used = code_histogram(misc["q"].detach().to(weight.device), rows).view(1, rows)
        lru = ReplaceState(counts[:rows].long().view(1, rows), weight.new_zeros(1, 0))
        state = count_down(lru, used, cfg)
        dead = state.counters[0] == 0
        num_dead = int(dead.sum())
        new_counts = state.counters[0].to(counts.dtype)
        if num_dead > 0:
            values = self._new_codes(module, misc, used[0], num_dead).to(weight.dtype)
            vectors = weight.new_zeros(rows, d)
            vectors[dead] = values
            params = VQParams(weight.detach(), weight.new_zeros(0, d), weight.new_zeros(0, d))
            candidates = Candidates(vectors.unsqueeze(0), dead.unsqueeze(0))
            params, state, _ = replace_expired(params, state, candidates, cfg)
            weight.data.copy_(params.codebook)
            new_counts = state.counters[0].to(counts.dtype)
        counts[:rows] = new_counts

    def _new_codes(self, module: Any, misc: dict[str, Any], used: Tensor, num_dead: int) -> Tensor:
        """The `num_dead` vectors that replace the dead codes, in their index order."""
        if self.policy == "self":
            p = used / used.sum()
            p = torch.exp(self.tau * p) - 1  # codes unused in the batch stay at 0
            picked = torch.multinomial(p, num_dead, replacement=True)
            values = module.codebook.weight.detach()[picked].clone()
        else:
            z_e = misc["z"].detach().flatten(0, -2)
            z_e = z_e[torch.randperm(z_e.size(0))]
            if self.policy == "input_kmeans" and z_e.size(0) >= num_dead:
                values = kmeans(z_e.float(), num_dead).to(z_e.dtype)
            else:
                repeats = num_dead // z_e.size(0) + 1
                if repeats > 1:
                    z_e = torch.cat(repeats * [z_e])
                values = z_e[:num_dead]
        if self.rho > 0:
            norm = values.norm(p=2, dim=-1, keepdim=True)
            values = values + self.rho * norm * torch.randn_like(values)
        return values


def lru_replacement(vq_module: nn.Module, rho: float = 1e-4, timeout: int = 100) -> nn.Module:
    """Give a VQ layer least-recently-used dead-code replacement; returns the layer.

    Example:
        >>> vq = lru_replacement(VectorQuant(32, 256), rho=1e-2, timeout=20)
    """
    ReplaceLRU.apply(vq_module, rho, timeout)
    return vq_module
