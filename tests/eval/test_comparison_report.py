"""The comparison's report pieces (hycam_ds/eval/comparison.py) on rows written by hand."""

import json

from hycam_ds.eval.comparison import running_mean, samples_markdown, sweep_table, table


def test_running_mean_averages_each_value_with_up_to_window_minus_one_before_it():
    assert running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert running_mean([2.0, 4.0, 9.0], 10) == [2.0, 3.0, 5.0]


def _row(method, lr, ppl, trainable, total, sweep=None):
    task = {"ppl": ppl, "bleu4": 10.0, "rougeL": 30.0}
    return {
        "method": method,
        "tasks": {"code": task},
        "average": {"ppl": ppl, "bleu4": 10.0, "rougeL": 30.0},
        "general_text": {"backbone_ppl": 89.1, "ppl": 81.3} if total else None,
        "trainable": trainable,
        "total": total,
        "train_seconds": 12.4,
        "lr": lr,
        "sweep": sweep,
    }


def test_table_has_a_row_per_method_and_the_sweep_marks_the_chosen_rate():
    sweep = {"candidates": [{"lr": 1e-3, "eval_loss": 2.5}, {"lr": 3e-3, "eval_loss": 2.25}]}
    rows = [_row("backbone", None, 6.74, 0, None), _row("hycam", 3e-3, 6.31, 50, 1000, sweep)]
    lines = table(rows).splitlines()
    assert lines[0].startswith("| method | lr | code ppl / BLEU-4 / ROUGE-L |")
    assert lines[2] == "| backbone | - | 6.74 / 10.00 / 30.00 | 6.74 | 10.00 | 30.00 | 0 | - | - |"
    assert (
        lines[3]
        == "| hycam | 0.003 | 6.31 / 10.00 / 30.00 | 6.31 | 10.00 | 30.00 | 50 (5.00%) | 12 s | 89.10 -> 81.30 |"
    )
    assert sweep_table(rows).splitlines()[2:] == ["| hycam | 0.001 | 2.5000 |  |", "| hycam | 0.003 | 2.2500 | yes |"]
    assert sweep_table(rows[:1]) == ""


def test_samples_put_every_method_beside_the_reference_per_task(tmp_path):
    def write(name, hypotheses):
        rows = [{"task": t, "reference": r, "hypothesis": h} for (t, r), h in hypotheses.items()]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(rows))
        return path

    refs = [("code", "a|b"), ("code", "c"), ("code", "d"), ("chat", "e")]
    files = {
        "backbone": write("backbone", {ref: f"bb {ref[1]}" for ref in refs}),
        "hycam": write("hycam", {ref: f"hy {ref[1]}" for ref in refs if ref != ("chat", "e")}),
        "lora": tmp_path / "missing.json",  # a method not evaluated yet is left out
    }
    lines = samples_markdown(files, per_task=2, width=4).splitlines()
    assert lines[0] == "| task | reference | backbone | hycam |"
    # two code rows (per_task), the pipe escaped, long cells cut; chat is skipped: hycam lacks it
    assert lines[2:] == ["| code | a\\|b | bb a ... | hy a ... |", "| code | c | bb c | hy c |"]
    assert samples_markdown({"lora": tmp_path / "missing.json"}) == ""
