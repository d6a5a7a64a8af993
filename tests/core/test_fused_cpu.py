"""The fused CPU kernel of the modulation against the torch-ops implementation, and its fallbacks."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hycam_ds import fused_cpu, modulation


def _leaves(rows, experts, rank, hidden, dtype=torch.float32, seed=0):
    """residual, joint, mid, spec_b, weights; u and target are column slices of joint (see _operands)."""
    g = torch.Generator().manual_seed(seed)
    return [t.requires_grad_() for t in (
        torch.randn(rows, hidden, generator=g, dtype=dtype),
        torch.randn(rows, 2 * hidden + 3, generator=g, dtype=dtype),
        torch.randn(rows, experts, rank, generator=g, dtype=dtype),
        torch.randn(experts, rank, hidden, generator=g, dtype=dtype) * 0.3,
        torch.softmax(torch.randn(rows, experts, generator=g, dtype=dtype) * 2, -1))]


def _operands(leaves, hidden):
    """u and target are row-strided column slices of one wider tensor, as the layer hands them over."""
    residual, joint, mid, spec_b, weights = leaves
    return residual, joint[:, hidden + 3:], joint[:, :hidden], mid, spec_b, weights


def _run(env_value, hard, monkeypatch, chunk_elements, experts=5, rank=8, hidden=64):
    monkeypatch.setenv("HYCAM_FUSED_CPU", env_value)
    monkeypatch.setattr(modulation, "_CPU_CHUNK_ELEMENTS", chunk_elements)
    leaves = _leaves(300, experts, rank, hidden)
    stats = {}
    out = modulation.modulate(*_operands(leaves, hidden), 0.5, hard, stats)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    return out.detach(), torch.autograd.grad(out, leaves, grad_out), stats


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("chunk_elements", [1 << 18, 5 * 64 * 7])  # one chunk; 7 rows per chunk (partial last)
def test_fused_equals_torch_ops_in_float32(hard, chunk_elements, monkeypatch):
    assert fused_cpu.load() is not None, "the fused CPU kernel must build on this machine (it has a C++ compiler)"
    fused = _run("1", hard, monkeypatch, chunk_elements)
    plain = _run("0", hard, monkeypatch, chunk_elements)
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(fused[1], plain[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for key in ("shared_magnitude", "specialized_magnitude"):
        torch.testing.assert_close(fused[2][key], plain[2][key], rtol=1e-5, atol=0)


@pytest.mark.parametrize("rank, hidden", [(6, 70), (3, 37), (1, 8)])
def test_fused_equals_torch_ops_off_the_vector_widths(rank, hidden, monkeypatch):
    """The float kernels work in blocks (4 ranks, 8/16/32 columns): every remainder path too."""
    fused = _run("1", False, monkeypatch, 5 * hidden * 7, experts=3, rank=rank, hidden=hidden)
    plain = _run("0", False, monkeypatch, 5 * hidden * 7, experts=3, rank=rank, hidden=hidden)
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(fused[1], plain[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_fused_kernel_is_taken_only_where_it_applies(monkeypatch):
    monkeypatch.setenv("HYCAM_FUSED_CPU", "1")
    x = torch.zeros(2, 3)
    assert fused_cpu.usable(x, x.double())
    assert not fused_cpu.usable(x, x.bfloat16()), "bf16 runs on torch ops"
    assert not fused_cpu.usable(x.half())
    monkeypatch.setenv("HYCAM_FUSED_CPU", "0")
    assert not fused_cpu.usable(x), "HYCAM_FUSED_CPU=0 turns it off"


def test_kernel_rejects_mismatched_operands_clearly():
    kernel = fused_cpu.load()
    residual, target, u, mid, spec_b, weights = (t.detach() for t in _operands(_leaves(4, 2, 3, 5), 5))
    with pytest.raises(RuntimeError, match="mid has dtype Double, expected Float"):
        kernel.forward(residual, target, u, mid.double(), spec_b, weights, 1.0, 64)
    with pytest.raises(RuntimeError, match="b must be contiguous"):
        kernel.forward(residual, target, u, mid, spec_b.transpose(1, 2).contiguous().transpose(1, 2), weights, 1.0, 64)


def test_a_failed_build_warns_once_and_falls_back_to_torch_ops(tmp_path):
    """No compiler / broken toolchain: training goes on (slower) with one warning that says why."""
    broken = tmp_path / "modulate_cpu.cpp"
    broken.write_text("#error simulated broken toolchain\n")
    script = textwrap.dedent(f"""
        import logging, torch
        logging.basicConfig(level=logging.WARNING)
        from hycam_ds import fused_cpu, modulation
        from pathlib import Path
        fused_cpu._SOURCE = Path({str(broken)!r})
        h = torch.randn(4, 6, requires_grad=True)
        out = modulation.modulate(h, h, torch.randn(4, 6), torch.randn(4, 3, 2), torch.randn(3, 2, 6),
                                  torch.softmax(torch.randn(4, 3), -1), 1.0, False)
        out.sum().backward()
        modulation.modulate(h, h, None, torch.randn(4, 3, 2), torch.randn(3, 2, 6), torch.softmax(torch.randn(4, 3), -1), 1.0, False)
        assert fused_cpu.load() is None and h.grad is not None
        print("FELL_BACK")
    """)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), HYCAM_FUSED_CPU="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FELL_BACK" in proc.stdout
    assert proc.stderr.count("fused CPU kernel is unavailable") == 1, proc.stderr[-3000:]
