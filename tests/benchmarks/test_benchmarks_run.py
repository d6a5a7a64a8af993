"""The benchmarks still run (at toy sizes) and print every row they promise; figures are not
checked here (timings belong to benchmarks, not tests)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(script, *args, timeout=600):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_hycam_step_benchmark_prints_every_variant():
    out = _run(
        "bench_hycam_step.py",
        "--hidden",
        "64",
        "--layers",
        "2",
        "--seq",
        "32",
        "--batch",
        "1",
        "--vocab",
        "256",
        "--steps",
        "1",
        "--warmup",
        "0",
    )
    for row in (
        "frozen backbone",
        "PEFT LoRA",
        "authors' code",
        "expert loop, simplified",
        "hycam-ds soft (paper)",
        "hycam-ds hard",
        "hycam-ds soft, torch ops",
        "hycam-ds soft, projection on torch's GEMM",
        "shared CAM alone",
    ):
        assert f"| {row}" in out, f"missing row {row!r} in:\n{out}"
    assert "vs the authors' code" in out and "vs the simplified expert loop" in out


def test_modulation_benchmark_prints_both_implementations():
    out = _run("bench_modulation.py", "--rows", "64", "--hidden", "32", "--repeats", "1")
    for row in ("| fused CPU kernel |", "| torch ops |", "| fused CPU kernel, hard |", "| torch ops, hard |"):
        assert row in out, f"missing {row!r} in:\n{out}"


def test_loss_memory_benchmark_prints_every_variant_and_the_ratios():
    out = _run(
        "bench_loss_memory.py",
        *("--batch", "1", "--seq", "64", "--vocab", "2048", "--hidden", "64", "--heads", "4", "--intermediate", "128"),
    )
    for row in ("| backbone alone", "| before: ", "| after: "):
        assert row in out, f"missing {row!r} in:\n{out}"
    assert "the loss's extra peak memory, after / before:" in out and "time of the step, after / before:" in out


def test_generation_benchmark_prints_both_models_and_the_ratio():
    out = _run("bench_generation.py", "--backbone-name", "tiny-llama", "--new-tokens", "4", "--rounds", "1")
    for row in ("| backbone |", "| hycam |", "HyCAM / backbone time ratio:"):
        assert row in out, f"missing {row!r} in:\n{out}"


@pytest.mark.slow
def test_train_methods_benchmark_prints_throughput_and_zero3_memory():
    out = _run("bench_train_methods.py", "--steps", "1", "--seq-len", "64", "--batch", "1", timeout=900)
    for row in ("| frozen backbone", "| hycam", "| lora", "| full", "| 1 |", "| 2 |"):
        assert row in out, f"missing {row!r} in:\n{out}"


def test_checkpoint_scale_benchmark_prints_every_side_at_each_world_size():
    out = _run("bench_checkpoint_scale.py", "--short", timeout=900)
    lines = out.splitlines()
    for header in (
        "| ranks | MB per rank | DeepSpeed save | ours, durable=false | ratio | DeepSpeed save + fsync "
        "| ours (default) |",
        "| ranks | MB per rank | DeepSpeed resume | ours | ratio | before: every rank checks all | ratio |",
    ):
        assert any(line.startswith(header) for line in lines), out
    for ranks in (1, 2):
        saves = [line for line in lines if line.startswith(f"| {ranks} |") and line.count("x |") == 3]
        resumes = [line for line in lines if line.startswith(f"| {ranks} |") and line.count("x |") == 2]
        assert len(saves) == 1 and len(resumes) == 1, out
