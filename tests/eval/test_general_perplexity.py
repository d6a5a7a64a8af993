"""General-text perplexity goes through the training loss's path (no fp32 copy of the logits) and
equals the plain formula: exp of the mean next-token cross-entropy of the full logits."""

import math

import pytest
import torch

import hycam_ds as H
from hycam_ds.eval.perplexity import general_perplexity
from hycam_ds.modeling.backbones import build_backbone

VOCAB = 96


def _plain(model, blocks: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=blocks, use_cache=False).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), blocks[:, 1:], reduction="mean")
    return math.exp(float(nll))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("hycam", [False, True])
def test_general_perplexity_equals_the_plain_formula(name, hycam):
    model = build_backbone(name, VOCAB, seed=1).eval()
    if hycam:
        H.apply_hycam(model, H.HyCAMConfig(num_specialized=3, rank=4))
        with torch.no_grad():  # away from the identity at init, so the adapter changes the result
            for _, parameter in H.hycam_named_parameters(model):
                parameter.normal_(0, 0.05)
    blocks = torch.randint(0, VOCAB, (5, 24), generator=torch.Generator().manual_seed(0))
    got = general_perplexity(model, blocks, batch_size=2, device=torch.device("cpu"))
    assert got == pytest.approx(_plain(model, blocks), rel=1e-5)
