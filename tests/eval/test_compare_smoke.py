"""launch/compare.py runs end to end (two methods, two steps, a tiny backbone) and writes its table and plot."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_compare_smoke(tmp_path):
    result = subprocess.run([sys.executable, "launch/compare.py", "--backbone-name", "tiny-llama", "--recipe", "data_pipeline/recipes/embedded.yaml",
                             "--methods", "hycam,lora", "--steps", "2", "--seq-len", "128", "--max-examples", "1", "--max-new-tokens", "4",
                             "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "comparison.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["hycam", "lora"]
    assert rows[0]["trainable"] > rows[1]["trainable"] > 0
    assert len(rows[0]["loss_curve"]) == 2 and set(rows[0]["tasks"]) == set(rows[1]["tasks"])
    assert (tmp_path / "loss_curves.png").stat().st_size > 0
    assert "| hycam |" in (tmp_path / "comparison.md").read_text()
