"""launch/evaluate.py end to end on a tiny trained run: one process and 2 ZeRO-3 ranks agree,
the report holds every task, generation with the adapter equals generation without cache, and
--dtype fp32 is the CPU default while --dtype bf16 stays close to it."""

import json
import sys
from pathlib import Path

import pytest
import torch
from run_helpers import free_port
from run_helpers import run_checked as _run

REPO = Path(__file__).resolve().parents[2]
# bf16 keeps 8 significant bits (relative rounding up to 2^-9 ~ 0.2% per value); the errors
# mostly cancel in a mean token NLL, and perplexity = exp(mean NLL) moves by as much relatively:
# 0.01-0.03% on this test's tiny run, 0.5-0.8% on SmolLM2-135M with a random adapter over a few
# hundred tokens. 1% holds the first with a wide margin; an adapter or backbone computed wrongly
# in bf16 moves it by far more.
BF16_PPL_REL = 0.01


@pytest.mark.distributed
def test_one_process_and_two_ranks_give_the_same_report(trained_run, tmp_path):
    general = tmp_path / "general"
    general.mkdir()
    (general / "text.txt").write_text(
        "\n".join(f"The number {i} follows {i - 1} and comes before {i + 1}." for i in range(1, 400))
    )
    common = [
        "--run-dir",
        str(trained_run),
        "--max-examples",
        "3",
        "--max-new-tokens",
        "12",
        "--batch-size",
        "4",
        "--general-text",
        str(general),
        "--general-tokens",
        "3000",
        "--no-progress",
    ]
    _run([sys.executable, "launch/evaluate.py", *common, "--out", str(tmp_path / "one")])
    port = str(free_port())
    _run(
        [
            str(Path(sys.executable).parent / "deepspeed"),
            "--num_gpus",
            "2",
            "--master_port",
            port,
            "launch/evaluate.py",
            "--ds_config",
            "ds_configs/zero3.json",
            *common,
            "--out",
            str(tmp_path / "two"),
        ]
    )
    one = json.loads((tmp_path / "one/report.json").read_text())
    two = json.loads((tmp_path / "two/report.json").read_text())
    tasks = json.loads(
        (Path(json.loads((trained_run / "run_info.json").read_text())["data_dir"]) / "manifest.json").read_text()
    )["tasks"]
    assert set(one["tasks"]) == {t["name"] for t in tasks}
    assert two["world_size"] == 2
    for task, values in one["tasks"].items():
        assert values["examples"] == 3
        for key in ("ppl", "bleu4", "rougeL"):
            assert two["tasks"][task][key] == pytest.approx(values[key], rel=1e-5, abs=1e-9), (task, key)
    assert two["general_text"]["ppl"] == pytest.approx(one["general_text"]["ppl"], rel=1e-5)
    assert one["general_text"]["ppl"] != one["general_text"]["backbone_ppl"]
    for name in ("report.md", "task_metrics.png", "routing_heatmap.png", "samples.json"):
        assert (tmp_path / "one" / name).is_file(), name
    table = (tmp_path / "one/report.md").read_text()
    assert all(f"| {t['name']} |" in table for t in tasks)


def test_generation_with_adapter_equals_generation_without_cache(trained_run):
    from data_pipeline import format_prompt, load_tokenizer
    from hycam_ds.eval.loading import ModelSpec, load_model

    info = json.loads((trained_run / "run_info.json").read_text())
    tokenizer = load_tokenizer(info["tokenizer"])
    model, _ = load_model(ModelSpec.from_run_dir(trained_run, len(tokenizer)))
    prompts = [format_prompt("Add 3 and 4."), format_prompt("Name a fruit.", "Think of a red one.")]
    for text in prompts:
        ids = torch.tensor([tokenizer.encode(text)])
        kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert torch.equal(
            model.generate(ids, use_cache=True, **kwargs), model.generate(ids, use_cache=False, **kwargs)
        )


def test_fp32_is_the_cpu_default_and_bf16_stays_close(trained_run, tmp_path):
    """--dtype fp32 reproduces the default report on CPU exactly; --dtype bf16 runs the same
    evaluation in bf16 (report.json says so) with perplexities within BF16_PPL_REL of fp32's."""
    common = [
        "--run-dir",
        str(trained_run),
        "--max-examples",
        "2",
        "--max-new-tokens",
        "8",
        "--batch-size",
        "4",
        "--max-ppl-rows",
        "8",
        "--no-progress",
    ]
    reports = {}
    for name, extra in (
        ("default", []),
        ("fp32", ["--dtype", "fp32"]),
        ("bf16", ["--dtype", "bf16", "--device", "cpu"]),
    ):
        _run([sys.executable, "launch/evaluate.py", *common, *extra, "--out", str(tmp_path / name)])
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
    assert reports["fp32"] == reports["default"]
    assert reports["default"]["dtype"] == "fp32" and reports["bf16"]["dtype"] == "bf16"
    for task, values in reports["fp32"]["tasks"].items():
        assert reports["bf16"]["tasks"][task]["ppl"] == pytest.approx(values["ppl"], rel=BF16_PPL_REL), task
    assert any(
        reports["bf16"]["tasks"][t]["ppl"] != v["ppl"] for t, v in reports["fp32"]["tasks"].items()
    ), "bf16 computed exactly fp32's numbers: it did not run in bf16"
