"""The LM loss made chunk by chunk (hycam_ds.kernels.cross_entropy, engine.lm_loss) equals the plain
formula, F.cross_entropy(logits[:, :-1].float()), in values and gradients: fp32 and bf16, chunks
that do not divide the token count, no loss token at all, packed rows; for HyCAM, LoRA (the head
plain, or LoRA-wrapped: the logits path) and full fine-tuning (a trained head)."""

import pytest
import torch
import torch.nn.functional as F

import hycam_ds as H
from data_pipeline import block_causal_mask
from hycam_ds.engine.lm_loss import add_task_sums, loss_head, packed_token_losses
from hycam_ds.kernels.cross_entropy import linear_cross_entropy, rows_cross_entropy
from hycam_ds.modeling.backbones import build_backbone

VOCAB = 97
# fp32: summation order only; bf16: the inputs' own rounding (logits and gradients are bf16 either way)
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _scaled(tolerance: dict, reference: torch.Tensor) -> dict:
    """The absolute tolerance in units of the reference tensor's largest value (when above 1): a
    gradient summed over many tokens (LoRA's reach several units) carries rounding in proportion to
    its size, ~1e-6 of it in fp32 for either summation order."""
    return dict(tolerance, atol=tolerance["atol"] * max(1.0, float(reference.abs().max())))


def _plain(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("trained_head", [False, True])
@pytest.mark.parametrize("tokens,chunk", [(37, 5), (37, 37), (37, 100), (0, 4)])
def test_linear_cross_entropy_equals_the_plain_formula(dtype, trained_head, tokens, chunk):
    g = torch.Generator().manual_seed(tokens + chunk)
    hidden = torch.randn(tokens, 16, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(VOCAB, 16, generator=g) * 0.5).to(dtype).requires_grad_(trained_head)
    targets = torch.randint(0, VOCAB, (tokens,), generator=g)
    upstream = torch.rand(tokens, generator=g)  # per-token weights, as the trainer's scaling and masking give

    expected = _plain(hidden, weight, targets)
    got = linear_cross_entropy(hidden, weight, targets, chunk)
    assert got.dtype == torch.float32 and got.shape == (tokens,)
    torch.testing.assert_close(got, expected, **TOLERANCE[dtype])
    inputs = (hidden, weight) if trained_head else (hidden,)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), inputs)
    got_grads = torch.autograd.grad((got * upstream).sum(), inputs)
    for want, have in zip(expected_grads, got_grads):
        assert have.dtype == dtype
        torch.testing.assert_close(have.float(), want.float(), **TOLERANCE[dtype])
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, chunk), expected.detach())


def test_bf16_gradients_are_as_accurate_as_the_plain_formulas():
    """In bf16 the frozen head's gradient is rounded at other points than autograd rounds it: it
    stays as close to the exact gradient (fp64, from the same bf16 values)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 64, generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(1000, 64, generator=g) * 0.3).bfloat16()
    targets, upstream = torch.randint(0, 1000, (300,), generator=g), torch.rand(300, generator=g)
    exact_hidden = hidden.detach().double().requires_grad_()
    (exact,) = torch.autograd.grad((_plain(exact_hidden, weight.double(), targets) * upstream).sum(), exact_hidden)
    (plain,) = torch.autograd.grad((_plain(hidden, weight, targets) * upstream).sum(), hidden)
    (chunked,) = torch.autograd.grad((linear_cross_entropy(hidden, weight, targets, 37) * upstream).sum(), hidden)

    def error(grad):
        return float((grad.double() - exact).abs().mean() / exact.abs().mean())

    assert error(chunked) <= 1.25 * error(plain), (error(chunked), error(plain))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_cross_entropy_equals_the_plain_formula(dtype):
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(30, VOCAB, generator=g) * 3).to(dtype).requires_grad_()
    rows = torch.tensor([0, 4, 5, 6, 11, 12, 13, 20, 29])
    targets = torch.randint(0, VOCAB, (len(rows),), generator=g)
    upstream = torch.rand(len(rows), generator=g)
    expected = F.cross_entropy(logits[rows].float(), targets, reduction="none")
    got = rows_cross_entropy(logits, rows, targets, chunk=4)
    torch.testing.assert_close(got, expected, **TOLERANCE[dtype])
    (want,) = torch.autograd.grad((expected * upstream).sum(), logits)
    (have,) = torch.autograd.grad((got * upstream).sum(), logits)
    assert have.dtype == dtype
    torch.testing.assert_close(have.float(), want.float(), **TOLERANCE[dtype])


# ----------------------------------------------------------------------------- packed rows, whole models
def _packed_batch(rows=3, length=21, seed=0, loss=True):
    """Two documents and padding per row, the first 3 tokens of each document a prompt (no loss)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, length), generator=g)
    segments = torch.zeros(rows, length, dtype=torch.int64)
    positions = torch.zeros_like(segments)
    labels = torch.full_like(ids, -100)
    tasks = torch.full_like(ids, -1)
    for r in range(rows):
        first = 6 + 2 * r
        for segment, (start, end) in enumerate([(0, first), (first, length - 3)], start=1):
            segments[r, start:end] = segment
            positions[r, start:end] = torch.arange(end - start)
            tasks[r, start:end] = (r + segment) % 2
            if loss:
                labels[r, start + 3 : end] = ids[r, start + 3 : end]
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "segment_ids": segments, "task_ids": tasks}


def _plain_losses(model, batch):
    """The formula packed_token_losses had: the full logits upcast to fp32 at once."""
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=block_causal_mask(batch["segment_ids"]),
        position_ids=batch["position_ids"],
        use_cache=False,
    ).logits
    labels = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels.clamp_min(0), reduction="none")
    mask = labels != -100
    return losses * mask, mask


def _model(method, dtype):
    model = build_backbone("tiny-llama", VOCAB, dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    if method == "hycam":
        H.apply_hycam(model, H.HyCAMConfig())
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # non-zero adapters (B_k and W_shared start at 0)
            for _, p in H.hycam_named_parameters(model):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        trained = H.hycam_parameters(model)
    elif method in ("lora", "lora on the head"):
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "v_proj"] + (["lm_head"] if method == "lora on the head" else [])
        # LoRA draws its random init from the global generator: seeded here, so that the weights do not
        # depend on which tests ran before in this process (pytest-xdist changes that order)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(2)
            config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
            model = get_peft_model(model, config)
        trained = [p for p in model.parameters() if p.requires_grad]
    else:  # full fine-tuning: the head itself trains
        for p in model.parameters():
            p.requires_grad_(True)
        trained = list(model.parameters())
    return model.eval(), trained  # eval: no Gumbel noise, so both formulas see the same forward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["hycam", "lora", "full", "lora on the head"])
def test_packed_token_losses_equal_the_plain_formula(method, dtype):
    model, trained = _model(method, dtype)
    assert (loss_head(model) is None) == (method == "lora on the head")
    batch = _packed_batch()
    upstream = torch.rand(3, 20, generator=torch.Generator().manual_seed(5))

    expected, expected_mask = _plain_losses(model, batch)
    # 7 tokens per chunk: 3 x 20 positions, 36 of them loss tokens, in 6 chunks (the last one of 1)
    got, mask = packed_token_losses(model, batch, "cpu", chunk_elements=7 * VOCAB)
    assert torch.equal(mask, expected_mask) and int(mask.sum()) == 36
    assert got.dtype == torch.float32 and got.shape == (3, 20)
    assert torch.all(got[~mask] == 0)
    torch.testing.assert_close(got, expected, **TOLERANCE[dtype])
    want = torch.autograd.grad((expected * upstream).sum(), trained, allow_unused=True)
    have = torch.autograd.grad((got * upstream).sum(), trained, allow_unused=True)
    compared = 0
    for w, h in zip(want, have):
        assert (w is None) == (h is None)
        if w is not None:
            torch.testing.assert_close(h.float(), w.float(), **_scaled(TOLERANCE[dtype], w))
            compared += 1
    assert compared > 0
    if method == "full":
        head = model.get_output_embeddings().weight
        assert any(p is head for p in trained), "the head's own gradient is compared"


def test_no_loss_token_gives_zero_losses_and_zero_gradients():
    model, trained = _model("hycam", torch.float32)
    got, mask = packed_token_losses(model, _packed_batch(loss=False), "cpu", chunk_elements=7 * VOCAB)
    assert not mask.any() and torch.equal(got, torch.zeros(3, 20))
    grads = torch.autograd.grad(got.sum(), trained, allow_unused=True)
    assert all(g is None or not g.any() for g in grads)


def test_evaluation_without_gradients_and_the_head_is_left_as_it_was():
    model, _ = _model("hycam", torch.float32)
    head = loss_head(model)
    batch = _packed_batch(seed=2)
    with torch.no_grad():
        got, _ = packed_token_losses(model, batch, "cpu", chunk_elements=5 * VOCAB)
        expected, _ = _plain_losses(model, batch)
    torch.testing.assert_close(got, expected, **TOLERANCE[torch.float32])
    assert "forward" not in vars(head)

    def fail(module, args):
        raise RuntimeError("injected failure inside the forward")

    handle = model.model.norm.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        packed_token_losses(model, batch, "cpu")
    handle.remove()
    assert "forward" not in vars(head), "the head must get its own forward back after a failed forward"


def test_task_sums_count_only_loss_tokens():
    model, _ = _model("hycam", torch.float32)
    batch = _packed_batch()
    with torch.no_grad():
        losses, mask = packed_token_losses(model, batch, "cpu")
    sums = torch.zeros(2, 2, dtype=torch.float64)
    add_task_sums(sums, losses, mask, batch["task_ids"])
    tasks = batch["task_ids"][:, 1:]
    for task in (0, 1):
        chosen = mask & (tasks == task)
        assert sums[task, 1] == int(chosen.sum())
        torch.testing.assert_close(sums[task, 0], losses[chosen].double().sum())
