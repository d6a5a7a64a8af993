"""launch/analyze_routing.py on a tiny trained run: its five trained tasks plus a task it never saw
(a user's alpaca file built with the run's tokenizer); one process and 2 ZeRO-3 ranks give the
same numbers; the distance matrix is a proper one; the unseen task is named with its nearest
trained tasks. And the Jensen-Shannon distance itself."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from run_helpers import free_port, run_checked

from hycam_ds.eval.routing_analysis import distance_matrices, js_distance

REPO = Path(__file__).resolve().parents[2]


def test_js_distance_is_a_bounded_symmetric_metric():
    p, q, r = np.array([0.7, 0.2, 0.1]), np.array([0.1, 0.3, 0.6]), np.array([0.3, 0.3, 0.4])
    assert js_distance(p, p) == 0.0
    assert js_distance(p, q) == pytest.approx(js_distance(q, p))
    assert js_distance([1, 0], [0, 1]) == pytest.approx(1.0)  # disjoint: the maximum (base 2)
    assert js_distance(p, q) <= js_distance(p, r) + js_distance(r, q) + 1e-12  # triangle inequality
    # by hand: JSD([1,0],[.5,.5]) = (KL([1,0]||[.75,.25]) + KL([.5,.5]||[.75,.25])) / 2
    m = np.array([0.75, 0.25])
    jsd = (math.log2(1 / m[0]) + 0.5 * math.log2(0.5 / m[0]) + 0.5 * math.log2(0.5 / m[1])) / 2
    assert js_distance([1, 0], [0.5, 0.5]) == pytest.approx(math.sqrt(jsd))
    per_layer, averaged = distance_matrices(np.stack([[p, q], [q, q], [r, p]]))
    assert per_layer.shape == (2, 3, 3) and np.allclose(averaged, averaged.T) and not averaged.diagonal().any()
    assert averaged[0, 1] == pytest.approx((js_distance(p, q) + js_distance(q, q)) / 2)


def _spelling_build(root: Path, *tokenizer) -> Path:
    """A task from a user's alpaca file, built with the given tokenizer arguments."""
    rows = [
        {"instruction": f"Spell the number {n} in words.", "input": "", "output": f"The number {n} is written {n}."}
        for n in range(300)
    ]
    (root / "spell.json").write_text(json.dumps(rows))
    (root / "recipe.yaml").write_text(
        "name: spell\nseq_len: 128\nsplits: {train: 0.5, eval: 0.1, test: 0.4}\n"
        "tokenizer: {vocab_size: 400, model_type: bpe}\n"
        "tasks:\n  - name: spelling\n    sources: [{type: alpaca, path: spell.json}]\n"
    )
    run_checked(
        [sys.executable, "-m", "data_pipeline", "build", "--recipe", root / "recipe.yaml", "--data-root", root]
        + ["--out", root / "build", *tokenizer, "--no-progress"]
    )
    return root / "build"


@pytest.fixture(scope="module")
def unseen_build(trained_run, tmp_path_factory):
    """A task the run never trained on, tokenised by the run's tokenizer."""
    return _spelling_build(tmp_path_factory.mktemp("unseen"), "--tokenizer", trained_run / "tokenizer")


@pytest.mark.distributed
def test_one_process_and_two_ranks_agree_and_the_unseen_task_is_placed(trained_run, unseen_build, tmp_path):
    own = Path(json.loads((trained_run / "run_info.json").read_text())["data_dir"])
    own = own if own.is_absolute() else trained_run / own
    common = ["--run-dir", trained_run, "--data", own, "--data", unseen_build]
    common += ["--batch-size", "4", "--no-progress"]
    run_checked([sys.executable, "launch/analyze_routing.py", *common, "--out", tmp_path / "one"])
    run_checked(
        [Path(sys.executable).parent / "deepspeed", "--num_gpus", "2", "--master_port", str(free_port())]
        + ["launch/analyze_routing.py", "--ds_config", "ds_configs/zero3.json", *common, "--out", tmp_path / "two"]
    )
    one, two = (json.loads((tmp_path / side / "report.json").read_text()) for side in ("one", "two"))
    trained = [t["name"] for t in json.loads((own / "manifest.json").read_text())["tasks"]]
    assert one["task_order"] == [*trained, "spelling"] and two["world_size"] == 2
    assert [one["tasks"][t]["seen"] for t in one["task_order"]] == [True] * len(trained) + [False]
    for task, values in one["tasks"].items():
        other = two["tasks"][task]
        assert other["routed_tokens"] == values["routed_tokens"] > 0
        assert other["ppl"] == pytest.approx(values["ppl"], rel=1e-5)
        assert other["backbone_ppl"] == pytest.approx(values["backbone_ppl"], rel=1e-5)
        for a, b in zip(values["layers"], other["layers"]):
            assert np.allclose(a["mean"], b["mean"], atol=1e-6) and np.allclose(a["top_share"], b["top_share"])
            assert sum(a["mean"]) == pytest.approx(1.0) and sum(a["top_share"]) == pytest.approx(1.0)
            assert 0 <= a["entropy"] <= math.log(len(a["mean"])) + 1e-9
        assert values["ppl"] != values["backbone_ppl"], "the adapter changes the perplexity"
    distance = np.array(one["distance"])
    assert np.allclose(distance, distance.T) and not distance.diagonal().any()
    assert np.allclose(distance, np.array(two["distance"]), atol=1e-6)
    nearest = one["nearest_trained"]["spelling"]
    assert len(nearest) == 3 and [n["distance"] for n in nearest] == sorted(n["distance"] for n in nearest)
    index = one["task_order"].index("spelling")
    assert nearest[0]["distance"] == pytest.approx(min(distance[index][: len(trained)]))
    assert one["specialisation"] > 0
    for name in ("report.md", "routing_heatmap.png", "routing_distance.png"):
        assert (tmp_path / "one" / name).stat().st_size > 0, name
    assert "Unseen task **spelling** routes most like:" in (tmp_path / "one" / "report.md").read_text()


def test_a_build_of_another_tokenizer_is_one_line(trained_run, tmp_path):
    from run_helpers import run_in_own_group

    other = _spelling_build(tmp_path, "--train-tokenizer")
    result = run_in_own_group(
        [sys.executable, "launch/analyze_routing.py", "--run-dir", trained_run, "--data", other]
        + ["--no-progress", "--out", tmp_path / "x"],
        timeout=600,
        cwd=REPO,
    )
    lines = [line for line in result.stderr.splitlines() if line.startswith("analyze_routing.py: ")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert str(other) in lines[0] and "tokenizer fingerprint mismatch" in lines[0]
    assert not (tmp_path / "x").exists()
