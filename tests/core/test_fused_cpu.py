"""The fused CPU kernel of the layer's modulation against the torch-ops implementation, and its fallbacks."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hycam_ds.kernels import fused_cpu, modulation
from hycam_ds.kernels.modulation import ProjectionLayout


def _leaves(rows, experts, rank, hidden, shared=True, dtype=torch.float32, seed=0):
    """residual, joint (target is a column slice of it), proj_wide (proj is a column slice), spec_n, spec_b."""
    g = torch.Generator().manual_seed(seed)
    width = ProjectionLayout(hidden, experts, rank, shared).width
    return [
        t.requires_grad_()
        for t in (
            torch.randn(rows, hidden, generator=g, dtype=dtype),
            torch.randn(rows, hidden + 3, generator=g, dtype=dtype),
            torch.randn(rows, width + 5, generator=g, dtype=dtype),
            torch.randn(experts, rank, rank, generator=g, dtype=dtype) * 0.5,
            torch.randn(experts, rank, hidden, generator=g, dtype=dtype) * 0.3,
        )
    ]


def _operands(leaves, layout):
    """target and proj are row-strided column slices of wider tensors, as the layer may hand them over."""
    residual, joint, proj_wide, spec_n, spec_b = leaves
    return residual, joint[:, 3:], proj_wide[:, 5:], layout, spec_n, spec_b


def _run(env_value, hard, monkeypatch, chunk_elements, experts=5, rank=8, hidden=64, shared=True, rows=300):
    monkeypatch.setenv("HYCAM_FUSED_CPU", env_value)
    monkeypatch.setattr(modulation, "_CPU_CHUNK_ELEMENTS", chunk_elements)
    layout = ProjectionLayout(hidden, experts, rank, shared)
    leaves = _leaves(rows, experts, rank, hidden, shared)
    noise = torch.randn(rows, experts, generator=torch.Generator().manual_seed(7))
    stats = {}
    out, weights, probs = modulation.modulate_layer(*_operands(leaves, layout), noise, 0.5, 0.5, hard, stats)
    g = torch.Generator().manual_seed(9)
    loss = (out * torch.randn(out.shape, generator=g)).sum() + (weights.mean(0) * probs.mean(0)).sum()
    return (out.detach(), weights.detach(), probs.detach()), torch.autograd.grad(loss, leaves), stats


def _assert_same(fused, plain):
    for a, b in zip(fused[0], plain[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(fused[1], plain[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("chunk_elements", [1 << 18, 5 * 64 * 7])  # one chunk; 7 rows per chunk (partial last)
def test_fused_equals_torch_ops_in_float32(hard, shared, chunk_elements, monkeypatch):
    assert fused_cpu.load() is not None, "the fused CPU kernel must build on this machine (it has a C++ compiler)"
    fused = _run("1", hard, monkeypatch, chunk_elements, shared=shared)
    plain = _run("0", hard, monkeypatch, chunk_elements, shared=shared)
    _assert_same(fused, plain)
    for key in ("shared_magnitude", "specialized_magnitude"):
        if shared or key == "specialized_magnitude":
            torch.testing.assert_close(fused[2][key], plain[2][key], rtol=1e-5, atol=0)
        else:
            assert fused[2][key] is None and plain[2][key] is None


@pytest.mark.parametrize("rank, hidden", [(6, 70), (3, 37), (1, 8)])
def test_fused_equals_torch_ops_off_the_vector_widths(rank, hidden, monkeypatch):
    """The float kernels work in blocks (4 ranks, 8/16/32 columns): every remainder path too."""
    fused = _run("1", False, monkeypatch, 5 * hidden * 7, experts=3, rank=rank, hidden=hidden)
    plain = _run("0", False, monkeypatch, 5 * hidden * 7, experts=3, rank=rank, hidden=hidden)
    _assert_same(fused, plain)


def test_fused_kernel_is_taken_only_where_it_applies(monkeypatch):
    monkeypatch.setenv("HYCAM_FUSED_CPU", "1")
    x = torch.zeros(2, 3)
    assert fused_cpu.usable(x, x.double())
    assert not fused_cpu.usable(x, x.bfloat16()), "bf16 runs on torch ops"
    assert not fused_cpu.usable(x.half())
    monkeypatch.setenv("HYCAM_FUSED_CPU", "0")
    assert not fused_cpu.usable(x), "HYCAM_FUSED_CPU=0 turns it off"


@pytest.mark.parametrize("shared, bias, scale", [(True, False, 4.0), (False, True, 4.0), (True, True, 2.7)])
def test_inference_from_x_equals_projecting_then_modulating(shared, bias, scale, monkeypatch):
    """infer_layer (decoding: the projection and the modulation in one kernel call) computes what
    the layer's two steps compute: to the bit at a power-of-two scale (alpha / rank = 4 at the
    defaults), to rounding at others (it scales mid B where training scales B), and stands aside
    where it does not apply."""
    monkeypatch.setenv("HYCAM_FUSED_CPU", "1")
    g = torch.Generator().manual_seed(3)
    rows, n, r, d = 3, 5, 8, 64

    def rand(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    x, residual = rand(rows, d, scale=1.0), rand(rows, d, scale=1.0)
    weights = (
        rand(d, d) if shared else None,
        rand(d) if shared and bias else None,
        rand(n * r, d),
        rand(n, d),
        rand(n) if bias else None,
    )
    spec_n, spec_b = rand(n, r, r), rand(n, r, d)
    w_shared, b_shared, spec_a, router_w, router_b = weights
    shared_part = [torch.nn.functional.linear(x, w_shared, b_shared)] if shared else []
    proj = torch.cat(shared_part + [x @ spec_a.t(), torch.nn.functional.linear(x, router_w, router_b)], dim=1)
    layout = ProjectionLayout(d, n, r, shared)
    stats, expected_stats = {}, {}
    with torch.no_grad():
        got = modulation.infer_layer(x, residual, residual, weights, spec_n, spec_b, None, 0.5, scale, False, stats)
        expected = modulation.modulate_layer(
            residual, residual, proj, layout, spec_n, spec_b, None, 0.5, scale, False, expected_stats
        )
    assert got is not None and stats.keys() == expected_stats.keys()
    magnitudes = [(stats[k], v) for k, v in expected_stats.items() if v is not None]
    for a, b in [*zip(got, (*expected, proj)), *magnitudes]:
        if scale == 4.0:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        bf16 = [None if w is None else w.bfloat16() for w in weights]
        assert (
            modulation.infer_layer(
                x.bfloat16(),
                residual.bfloat16(),
                residual.bfloat16(),
                bf16,
                spec_n.bfloat16(),
                spec_b.bfloat16(),
                None,
                0.5,
                4.0,
                False,
            )
            is None
        ), "bf16 runs on torch ops"
    spec_b.requires_grad_()
    assert modulation.infer_layer(x, residual, residual, weights, spec_n, spec_b, None, 0.5, 4.0, False) is None


def test_kernel_rejects_mismatched_operands_clearly():
    kernel = fused_cpu.load()
    layout = ProjectionLayout(5, 2, 3, True)
    residual, target, proj, _, spec_n, spec_b = (
        t.detach() if torch.is_tensor(t) else t for t in _operands(_leaves(4, 2, 3, 5), layout)
    )
    cols = (layout.u_col, layout.low_col, layout.logit_col)
    with pytest.raises(RuntimeError, match="n has dtype Double, expected Float"):
        kernel.layer_forward(
            residual, target, proj, spec_n.double(), spec_b, torch.empty(0), *cols, 0.5, 1.0, False, 64
        )
    with pytest.raises(RuntimeError, match="b must be contiguous"):
        kernel.layer_forward(
            residual,
            target,
            proj,
            spec_n,
            spec_b.transpose(1, 2).contiguous().transpose(1, 2),
            torch.empty(0),
            *cols,
            0.5,
            1.0,
            False,
            64,
        )
    with pytest.raises(RuntimeError, match=r"does not hold the packed columns"):
        kernel.layer_forward(residual, target, proj[:, :10], spec_n, spec_b, torch.empty(0), *cols, 0.5, 1.0, False, 64)
    with pytest.raises(RuntimeError, match=r"noise must be \[T, N\] = \[4, 2\]"):
        kernel.layer_forward(residual, target, proj, spec_n, spec_b, torch.zeros(4, 3), *cols, 0.5, 1.0, False, 64)


def test_a_failed_build_warns_once_and_falls_back_to_torch_ops(tmp_path):
    """No compiler / broken toolchain: training goes on (slower) with one warning that says why."""
    broken = tmp_path / "modulate_cpu.cpp"
    broken.write_text("#error simulated broken toolchain\n")
    script = textwrap.dedent(f"""
        import logging, torch
        logging.basicConfig(level=logging.WARNING)
        from hycam_ds.kernels import fused_cpu, modulation
        from pathlib import Path
        fused_cpu._SOURCE = Path({str(broken)!r})
        layout = modulation.ProjectionLayout(6, 3, 2, True)
        h = torch.randn(4, 6, requires_grad=True)
        for _ in range(2):
            out, weights, probs = modulation.modulate_layer(
                h, h, torch.randn(4, layout.width), layout, torch.randn(3, 2, 2),
                torch.randn(3, 2, 6), torch.randn(4, 3), 0.5, 1.0, False,
            )
            out.sum().backward()
        assert fused_cpu.load() is None and h.grad is not None
        print("FELL_BACK")
    """)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), HYCAM_FUSED_CPU="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FELL_BACK" in proc.stdout
    assert proc.stderr.count("fused CPU kernel is unavailable") == 1, proc.stderr[-3000:]


def test_the_library_name_follows_its_build_recipe(monkeypatch, tmp_path):
    """Two checkouts (or an edited source) never share one build directory: torch would rebuild it at
    every switch and make the other wait on its lock."""
    from hycam_ds.kernels import fused_cpu

    name = fused_cpu._library_name("avx2", ["-O3"])
    assert name.startswith("hycam_modulate_cpu_avx2_") and name == fused_cpu._library_name("avx2", ["-O3"])
    assert fused_cpu._library_name("avx2", ["-O2"]) != name
    copy = tmp_path / "modulate_cpu.cpp"
    copy.write_bytes(fused_cpu._SOURCE.read_bytes())
    monkeypatch.setattr(fused_cpu, "_SOURCE", copy)
    assert fused_cpu._library_name("avx2", ["-O3"]) != name
