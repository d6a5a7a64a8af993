"""Each method, through the real entry point, overfits a tiny dataset: the loss must fall."""

import re

import pytest
from run_helpers import REPO, run_train, train_losses


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory):
    text = (REPO / "data_pipeline/recipes/embedded.yaml").read_text()
    text = re.sub(r"count: \d+", "count: 6", text)  # 30 examples in all
    text = re.sub(r"splits: \{[^}]*\}", "splits: {train: 1.0, eval: 0.0, test: 0.0}", text)
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "method,checkpointing", [("hycam", False), ("lora", False), ("full", False), ("cam", False), ("hycam", True)]
)
def test_overfitting_a_tiny_dataset_lowers_the_loss(tmp_path, tiny_recipe, method, checkpointing):
    run_train(
        [
            f"run_dir={tmp_path}/run",
            f"method={method}",
            f"model.gradient_checkpointing={str(checkpointing).lower()}",
            f"data.recipe={tiny_recipe}",
            f"data.cache_dir={tmp_path}/data",
            "data.seq_len=128",
            "optim.max_steps=50",
            "optim.warmup_steps=2",
            "optim.lr=1e-2",
            "logging.eval_every=0",
            "checkpoint.save_every=0",
            "checkpoint.export_adapter=false",
            "logging.progress=false",
        ]
    )
    losses = [loss for _, loss in train_losses(tmp_path / "run")]
    assert len(losses) == 50
    final = sum(losses[-5:]) / 5
    assert final < losses[0] - 0.5, f"{method}: loss {losses[0]:.3f} -> {final:.3f}"
