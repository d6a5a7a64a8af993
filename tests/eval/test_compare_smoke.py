"""launch/compare.py runs end to end on a tiny backbone: the untouched backbone's row, a learning-rate
sweep scored on the eval split whose winner is continued to the end, an ablation that inherits the
swept learning rate; it writes its table, sweep and plot, and a second invocation reuses every stage."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def compare(out: Path, *extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [
            sys.executable,
            "launch/compare.py",
            "--backbone-name",
            "tiny-llama",
            "--recipe",
            "data_pipeline/recipes/embedded.yaml",
            "--steps",
            "3",
            "--seq-len",
            "128",
            "--max-examples",
            "1",
            "--max-new-tokens",
            "4",
            "--out",
            str(out),
            *extra,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_compare_smoke(tmp_path):
    compare(tmp_path, "--methods", "hycam,lora")
    rows = json.loads((tmp_path / "comparison.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["hycam", "lora"]
    assert rows[0]["trainable"] > rows[1]["trainable"] > 0
    assert [r["lr"] for r in rows] == [1e-3, 1e-3]  # no sweep: each method's first candidate
    assert len(rows[0]["loss_curve"]) == 3 and set(rows[0]["tasks"]) == set(rows[1]["tasks"])
    assert (tmp_path / "loss_curves.png").stat().st_size > 0
    assert "| hycam | 0.001 |" in (tmp_path / "comparison.md").read_text()


def test_compare_sweep_backbone_row_and_resume(tmp_path):
    args = (
        "--methods",
        "backbone,hycam,hycam (no balance loss)",
        "--sweep-steps",
        "1",
        "--lrs",
        "hycam=1e-3,0.5",
        "--save-every",
        "1",
        "--ppl-rows",
        "2",
    )
    compare(tmp_path, *args)
    result = json.loads((tmp_path / "comparison.json").read_text())
    backbone, hycam, ablation = result["rows"]
    assert backbone["method"] == "backbone" and backbone["trainable"] == 0 and backbone["loss_curve"] == []
    candidates = hycam["sweep"]["candidates"]
    assert [c["lr"] for c in candidates] == [1e-3, 0.5]
    best = min(candidates, key=lambda c: c["eval_loss"])
    assert hycam["lr"] == best["lr"] == ablation["lr"]
    # the winner was continued from its sweep checkpoint: its curve holds the sweep's step and the rest
    assert [s for s, _ in hycam["loss_curve"]] == [1, 2, 3]
    assert [s for s, _ in ablation["loss_curve"]] == [1, 2, 3] and ablation["sweep"] is None
    assert "eval-split loss" in (tmp_path / "comparison.md").read_text()
    assert json.loads((tmp_path / "backbone/eval/report.json").read_text())["max_ppl_rows"] == 2
    samples = (tmp_path / "samples.md").read_text().splitlines()
    assert samples[0] == "| task | reference | backbone | hycam | hycam (no balance loss) |" and len(samples) > 2
    again = compare(tmp_path, *args)
    assert "training at lr" not in again.stdout and "evaluating" not in again.stdout


def test_held_out_task_and_a_variant_beyond_the_paper(tmp_path):
    """--exclude-tasks builds the recipe without a task (held out); a named variant (site=ffn) trains
    at HyCAM's learning rate with its own setting."""
    compare(tmp_path, "--methods", "hycam,hycam (site=ffn)", "--exclude-tasks", "code")
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == ["arithmetic", "medical", "general", "retrieval"]
    rows = json.loads((tmp_path / "comparison.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["hycam", "hycam (site=ffn)"] and rows[0]["lr"] == rows[1]["lr"]
    assert all("code" not in r["tasks"] for r in rows)
    config = json.loads((tmp_path / "hycam_site_ffn" / "run" / "config.json").read_text())
    assert config["hycam"]["site"] == "ffn" and config["method"] == "hycam"
    bad = subprocess.run(
        [sys.executable, "launch/compare.py", "--backbone-name", "tiny-llama", "--out", str(tmp_path / "bad")]
        + ["--recipe", "data_pipeline/recipes/embedded.yaml", "--methods", "hycam", "--exclude-tasks", "cooking"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "--exclude-tasks cooking" in bad.stderr.strip().splitlines()[-1], bad.stderr
    assert not (tmp_path / "bad").exists(), "refused before anything is written"
