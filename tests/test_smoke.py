"""The README's vqtorch usage, run as written (with vqfunc for vqtorch, on CPU)."""

import torch

from vqfunc import VectorQuantize


def test_vqtorch_readme_layer_usage() -> None:
    vq = VectorQuantize(feature_size=32, num_codes=256)
    z_e = torch.randn(1, 32, 16, 16)
    z_q, misc = vq(z_e)
    assert z_q.shape == z_e.shape
    assert misc["loss"].ndim == 0
    assert misc["codes"].shape == (1, 16, 16)
