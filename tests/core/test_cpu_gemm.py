"""The projection's oneDNN path on CPU (hycam_ds/cpu_gemm.py) against F.linear, and its fallbacks."""

import logging

import pytest
import torch
import torch.nn.functional as F

from hycam_ds.kernels import cpu_gemm


def _operands(dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(37, 24, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(40, 24, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(40, generator=g, dtype=dtype).requires_grad_() if bias else None
    return x, weight, b


@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_equals_f_linear_with_gradients(bias, monkeypatch):
    monkeypatch.setenv("HYCAM_ONEDNN_LINEAR", "1")
    assert torch.backends.mkldnn.is_available(), "torch's CPU build ships oneDNN"
    leaves = [t for t in _operands(bias=bias) if t is not None]
    grad = torch.randn(37, 40, generator=torch.Generator().manual_seed(1))
    results = []
    for fn in (cpu_gemm.linear, F.linear):
        out = fn(*leaves) if bias else fn(*leaves, None)
        results.append((out.detach(), torch.autograd.grad(out, leaves, grad)))
    assert cpu_gemm._applies(leaves[0], leaves[1]) and not cpu_gemm._broken
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    again = cpu_gemm.linear(*leaves) if bias else cpu_gemm.linear(*leaves, None)
    assert torch.equal(again.detach(), results[0][0]), "deterministic for a given thread count"


def test_input_without_gradient_gets_none():
    x, weight, bias = _operands()
    out = cpu_gemm.linear(x.detach(), weight, bias)
    grads = torch.autograd.grad(out.sum(), (weight, bias))
    torch.testing.assert_close(grads[1], torch.full((40,), 37.0))


def test_other_dtypes_devices_and_the_switch_take_f_linear(monkeypatch):
    x, weight, _ = _operands()
    assert not cpu_gemm._applies(x.double(), weight.double()), "float64 (gradcheck) runs on F.linear"
    assert not cpu_gemm._applies(x.bfloat16(), weight.bfloat16())
    monkeypatch.setenv("HYCAM_ONEDNN_LINEAR", "0")
    assert not cpu_gemm._applies(x, weight)


def test_a_few_rows_take_f_linear():
    """Decoding's matrix-vector products stay on torch's BLAS (cpu_gemm's docstring)."""
    x, weight, _ = _operands()
    assert not cpu_gemm._applies(x[: cpu_gemm.FEW_ROWS], weight)
    assert cpu_gemm._applies(x[: cpu_gemm.FEW_ROWS + 1], weight)


def test_a_failing_onednn_call_warns_once_and_falls_back(monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("simulated: op not in this build")

    monkeypatch.setattr(cpu_gemm, "_onednn_linear", broken)
    monkeypatch.setattr(cpu_gemm, "_broken", False)
    x, weight, bias = _operands()
    with caplog.at_level(logging.WARNING, logger="hycam_ds.kernels.cpu_gemm"):
        for _ in range(3):
            out = cpu_gemm.linear(x, weight, bias)
    torch.testing.assert_close(out, F.linear(x, weight, bias))
    assert [r.getMessage() for r in caplog.records].count(
        "oneDNN linear unavailable (RuntimeError: simulated: op not in this build); HyCAM's projection uses F.linear"
    ) == 1
