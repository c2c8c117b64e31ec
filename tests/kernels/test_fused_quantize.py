"""The fused straight-through quantizer (`vqfunc._fused_quantize`, its compiled pass
`vqfunc/_kernels/csrc/fused_forward.c` and its torch fallback) against a float64 brute-force
reference: validity, z, the output, z_q, codes, distances, the loss, the histogram, the
perplexity, the invalid count and both gradients, with non-finite rows, masks, shared and
separate codebooks, the synchronized update, streaming stores and one or two threads."""

from __future__ import annotations

import math

import pytest
import torch
from support.profiling import kernel_calls
from support.weights import row_weights

import vqfunc
from vqfunc._fused_quantize import fused_quantize
from vqfunc._kernels import cpu as _cpu_kernel
from vqfunc._kernels import fused_forward_cpu as _fused_cpu

FUSED = "vqfunc.cpu_kernel.fused_forward"
needs_kernel = pytest.mark.skipif(
    not _cpu_kernel.available(), reason="the compiled CPU kernel does not build here"
)


def _reference(
    rows: torch.Tensor,
    codebook: torch.Tensor,
    mask: torch.Tensor | None,
    beta: float,
    nu: float,
    upstream: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Every output and both gradients from the plain formulas, in float64 (brute-force search)."""
    x = rows.double().requires_grad_(True)
    book = codebook.double().requires_grad_(True)
    m, groups, d = rows.shape
    valid = torch.isfinite(rows).flatten(1).all(-1)
    z = torch.where(valid.view(-1, 1, 1), x, torch.zeros((), dtype=torch.float64))
    books = book.unsqueeze(0).expand(groups, -1, -1) if book.dim() == 2 else book
    sq = ((z.detach().unsqueeze(2) - books.detach().unsqueeze(0)) ** 2).sum(-1)  # [M, G, K]
    codes = sq.argmin(-1).masked_fill(~valid.unsqueeze(-1), 0)
    z_q = books[torch.arange(groups), codes]  # [M, G, d]
    distances = (z.detach() - z_q.detach()).norm(dim=-1).masked_fill(~valid.unsqueeze(-1), math.nan)
    out = z + (z_q - z).detach()
    if nu > 0:
        out = out + nu * (z_q - z_q.detach())
    w = valid.double() * (1.0 if mask is None else mask.double())
    count = max(float(w.sum()) * groups * d, 1.0)
    commit = ((z - z_q.detach()) ** 2).sum((1, 2))
    codebook_term = ((z.detach() - z_q) ** 2).sum((1, 2))
    loss = ((1 - beta) * (w * commit).sum() + beta * (w * codebook_term).sum()) / count
    num_books = 1 if codebook.dim() == 2 else groups
    histogram = torch.zeros(num_books, codebook.shape[-2], dtype=torch.float64)
    for i in range(m):
        for g in range(groups):
            histogram[0 if num_books == 1 else g, codes[i, g]] += w[i]
    p = histogram / histogram.sum(-1, keepdim=True).clamp_min(1e-300)
    perplexity = torch.exp(-torch.special.xlogy(p, p).sum(-1)).mean()
    task = upstream["loss"] * loss + (out * upstream["out"]).sum()
    task = task + (z_q * upstream["z_q"]).sum() + (z * upstream["z"]).sum()
    grad_rows, grad_book = torch.autograd.grad(task, (x, book))
    return {
        "z": z.detach(),
        "out": out.detach(),
        "z_q": z_q.detach(),
        "codes": codes,
        "distances": distances,
        "loss": loss.detach(),
        "histogram": histogram,
        "valid": valid,
        "num_invalid": (~valid).sum(),
        "perplexity": perplexity,
        "grad_rows": grad_rows,
        "grad_codebook": grad_book,
    }


def _case(
    m: int, groups: int, d: int, k: int, share: bool, mask: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(m, groups, d, generator=g)
    if m >= 8:
        rows[1, 0, 0] = math.nan
        rows[4, groups - 1, d - 1] = math.inf
        rows[6] = -math.inf
    shape = (k, d) if share else (groups, k, d)
    codebook = torch.randn(*shape, generator=g)
    return rows, codebook, row_weights(m, mask, g)


def _run(
    rows: torch.Tensor,
    codebook: torch.Tensor,
    mask: torch.Tensor | None,
    beta: float,
    nu: float,
    upstream: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    x = rows.clone().requires_grad_(True)
    book = codebook.clone().requires_grad_(True)
    r = fused_quantize(x, book, mask, beta=beta, nu=nu)
    task = upstream["loss"].float() * r.loss + (r.out * upstream["out"].float()).sum()
    task = task + (r.z_q * upstream["z_q"].float()).sum() + (r.z * upstream["z"].float()).sum()
    grad_rows, grad_book = torch.autograd.grad(task, (x, book))
    return {**r._asdict(), "grad_rows": grad_rows, "grad_codebook": grad_book}


def _compare(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    for name in ("codes", "valid", "num_invalid"):
        assert torch.equal(got[name], want[name]), name
    for name, value in want.items():
        if name in ("codes", "valid", "num_invalid"):
            continue
        torch.testing.assert_close(
            got[name].double(), value, rtol=1e-5, atol=1e-5, equal_nan=True, msg=name
        )


def _upstream(rows: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 100)
    return {
        name: torch.randn(rows.shape, generator=g, dtype=torch.float64)
        for name in ("out", "z_q", "z")
    } | {"loss": torch.tensor(1.7, dtype=torch.float64)}


@pytest.mark.parametrize("backend", ["compiled", "torch"])
@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("mask", ["none", "bool", "float"])
@pytest.mark.parametrize("nu", [0.0, 0.5])
def test_outputs_and_gradients_match_the_float64_reference(
    backend: str, share: bool, groups: int, mask: str, nu: float
) -> None:
    if backend == "compiled" and not _cpu_kernel.available():
        pytest.skip("the compiled CPU kernel does not build here")
    rows, codebook, weights = _case(40, groups, 5, 7, share, mask, seed=groups + 2 * share)
    upstream = _upstream(rows, groups)
    want = _reference(rows, codebook, weights, 0.3, nu, upstream)
    with vqfunc.kernels.use(cpu=backend):
        got, calls = kernel_calls(lambda: _run(rows, codebook, weights, 0.3, nu, upstream))
    assert calls[FUSED] == (1 if backend == "compiled" else 0)
    _compare(got, want)
    # No gradient reaches an invalid row, whatever the upstream gradients.
    assert (got["grad_rows"][~want["valid"]] == 0).all()


@pytest.mark.parametrize("backend", ["compiled", "torch"])
@pytest.mark.parametrize("mask", ["none", "float"])
def test_gradients_of_a_batch_without_invalid_rows_match_the_float64_reference(
    backend: str, mask: str
) -> None:
    # With every row valid the backward skips zeroing the invalid rows' gradient (eager only).
    if backend == "compiled" and not _cpu_kernel.available():
        pytest.skip("the compiled CPU kernel does not build here")
    rows, codebook, weights = _case(7, 2, 5, 9, True, mask, seed=11)
    assert torch.isfinite(rows).all()
    upstream = _upstream(rows, 11)
    want = _reference(rows, codebook, weights, 0.3, 0.5, upstream)
    with vqfunc.kernels.use(cpu=backend):
        got = _run(rows, codebook, weights, 0.3, 0.5, upstream)
    _compare(got, want)
    assert got["grad_rows"].abs().min() > 0


def test_forward_and_backward_run_on_fake_tensors() -> None:
    # Shapes without data (what torch.compile and memory estimates see): the backward must not
    # branch on the rows' validity there.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        rows = torch.randn(6, 2, 4, requires_grad=True)
        codebook = torch.randn(5, 4, requires_grad=True)
        r = fused_quantize(rows, codebook, None, beta=0.25, nu=0.5)
        (r.out.sum() + r.z_q.sum() + r.loss).backward()
        assert rows.grad is not None and codebook.grad is not None
        assert rows.grad.shape == rows.shape and codebook.grad.shape == codebook.shape


@needs_kernel
@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("d", [8, 16, 13])
def test_streaming_stores_and_threads_give_the_reference(
    stream: bool, threads: int, d: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Streaming needs d % 8 == 0 (and aligned tensors): d = 13 checks the fallback to plain stores.
    monkeypatch.setattr(_fused_cpu, "_STREAM_BYTES", 0 if stream else 1 << 62)
    monkeypatch.setattr(_fused_cpu, "_MIN_ELEMENTS_PER_THREAD", 1)
    rows, codebook, weights = _case(300, 2, d, 33, True, "float", seed=d)
    upstream = _upstream(rows, d)
    want = _reference(rows, codebook, weights, 0.9, 0.0, upstream)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = _run(rows, codebook, weights, 0.9, 0.0, upstream)
    finally:
        torch.set_num_threads(previous)
    _compare(got, want)


@needs_kernel
def test_zero_one_weights_give_exact_counts_for_any_thread_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_fused_cpu, "_MIN_ELEMENTS_PER_THREAD", 1)
    rows, codebook, weights = _case(2000, 1, 4, 16, True, "bool", seed=5)
    histograms = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            histograms.append(fused_quantize(rows, codebook, weights, beta=0.5, nu=0.0).histogram)
    finally:
        torch.set_num_threads(previous)
    want = _reference(rows, codebook, weights, 0.5, 0.0, _upstream(rows, 0))["histogram"]
    assert torch.equal(histograms[0].double(), want) and torch.equal(histograms[1].double(), want)


@pytest.mark.parametrize("backend", ["compiled", "torch"])
def test_an_empty_batch_and_an_all_invalid_batch(backend: str) -> None:
    if backend == "compiled" and not _cpu_kernel.available():
        pytest.skip("the compiled CPU kernel does not build here")
    codebook = torch.randn(6, 4)
    with vqfunc.kernels.use(cpu=backend):
        empty = fused_quantize(torch.empty(0, 1, 4), codebook, None, beta=0.5, nu=0.0)
        bad = fused_quantize(torch.full((5, 1, 4), math.nan), codebook, None, beta=0.5, nu=0.0)
    assert empty.z.shape == (0, 1, 4) and float(empty.loss) == 0.0
    assert float(empty.histogram.sum()) == 0.0 and float(empty.perplexity) == 1.0
    assert int(bad.num_invalid) == 5 and not bad.valid.any() and float(bad.loss) == 0.0
    assert (bad.codes == 0).all() and bad.distances.isnan().all() and (bad.z == 0).all()
    assert torch.equal(bad.out, codebook[0].expand(5, 1, 4))


def test_reported_values_carry_no_gradient() -> None:
    rows = torch.randn(20, 1, 3, requires_grad=True)
    codebook = torch.randn(4, 3, requires_grad=True)
    r = fused_quantize(rows, codebook, None, beta=0.5, nu=0.0)
    for name in ("codes", "distances", "histogram", "valid", "num_invalid", "perplexity"):
        assert not getattr(r, name).requires_grad, name
    for name in ("z", "out", "z_q", "loss"):
        assert getattr(r, name).requires_grad, name


@needs_kernel
def test_quantize_takes_the_fused_pass_only_where_it_applies() -> None:
    x = torch.randn(50, 8)
    for cfg, fused in (
        (vqfunc.VQConfig(feature_size=8, num_codes=16, dim=-1), True),
        (vqfunc.VQConfig(feature_size=8, num_codes=16, dim=-1, groups=2, share=False), True),
        (vqfunc.VQConfig(feature_size=8, num_codes=16, dim=-1, dist="cosine"), False),
        (vqfunc.VQConfig(feature_size=8, num_codes=16, dim=-1, estimator="rotation"), False),
    ):
        params = vqfunc.init_params(cfg, generator=torch.Generator().manual_seed(0))
        (z_q, out), calls = kernel_calls(lambda: vqfunc.quantize(params, x, cfg))  # noqa: B023
        assert (calls[FUSED] == 1) == fused, cfg
        with vqfunc.kernels.use(cpu="torch"):
            (want_z_q, want), calls = kernel_calls(lambda: vqfunc.quantize(params, x, cfg))  # noqa: B023
        assert calls[FUSED] == 0
        assert torch.equal(out.codes, want.codes)
        torch.testing.assert_close(z_q, want_z_q)
        torch.testing.assert_close(out.loss, want.loss)
        torch.testing.assert_close(out.histogram, want.histogram)
        torch.testing.assert_close(out.perplexity, want.perplexity)


@needs_kernel
def test_the_wrapper_refuses_bad_shapes_and_codes() -> None:
    rows, codebook = torch.randn(10, 1, 4), torch.randn(6, 4)
    codes, distances = torch.zeros(10, 1, dtype=torch.int64), torch.zeros(10, 1)
    with pytest.raises(
        ValueError, match=r"codebook: expected a torch.float32 CPU tensor of shape \(6, 4\)"
    ):
        _fused_cpu.forward(rows, codebook.double(), codes, distances, None)
    with pytest.raises(ValueError, match=r"mask: expected .* shape \(10,\)"):
        _fused_cpu.forward(rows, codebook, codes, distances, torch.ones(9))
    with pytest.raises(RuntimeError, match="a code outside the codebook"):
        _fused_cpu.forward(rows, codebook, codes + 6, distances, None)


@pytest.mark.parametrize("share", [True, False])
def test_the_eager_route_the_operator_and_the_function_agree_bit_for_bit(share: bool) -> None:
    # Plain eager calls take an old-style Function around the implementation; the registered
    # operator (tensor subclasses) and the transform Function must give the same numbers,
    # first and second derivatives included.
    from vqfunc import _fused_quantize as fq

    rows, codebook, mask = _case(12, 2, 8, 20, share, "float", seed=5)
    upstream = _upstream(rows, seed=5)

    def run(route: object) -> list[torch.Tensor]:
        x = rows.clone().requires_grad_(True)
        book = codebook.clone().requires_grad_(True)
        r = fq.FusedQuantized(*route(x, book, mask, 0.25, 0.5))  # type: ignore[operator]
        task = 1.7 * r.loss + (r.out * upstream["out"].float()).sum()
        task = task + (r.z_q * upstream["z_q"].float()).sum() + (r.z * upstream["z"].float()).sum()
        # Without a graph the backward calls the implementation, with one the operator.
        plain = torch.autograd.grad(task, (x, book), retain_graph=True)
        grad_rows, grad_book = torch.autograd.grad(task, (x, book), create_graph=True)
        (second,) = torch.autograd.grad((grad_book**2).sum(), (book,))
        return [*r, *plain, grad_rows.detach(), grad_book.detach(), second]

    eager = run(lambda *a: fused_quantize(*a[:3], beta=a[3], nu=a[4]))
    assert fq.plain_eager(rows, codebook, mask)
    assert all(torch.equal(a, b) for a, b in zip(eager[-5:-3], eager[-3:-1], strict=True))
    for other in (run(fq._fused_op), run(fq._FusedQuantize.apply)):
        for a, b in zip(eager, other, strict=True):
            same_nans = bool((a.isnan() == b.isnan()).all())
            assert same_nans and torch.equal(a.nan_to_num(), b.nan_to_num())
