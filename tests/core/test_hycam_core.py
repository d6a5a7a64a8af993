"""HyCAM core: identity at init, equivalence with the paper's equation, training invariants,
balance loss, determinism, generation, gradient checkpointing, families."""

import math

import pytest
import torch

import hycam_ds as H
from hycam_ds.modeling.backbones import build_backbone
from hycam_ds.modeling.injection import hycam_layers, hycam_state
from hycam_ds.modeling.reference import (
    reference_balance_loss,
    reference_equation,
    reference_modulate_layer,
    reference_modulation,
)
from hycam_ds.modeling.router import gumbel_noise

FAMILIES = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3"]
SITES = ["attention", "residual", "ffn"]
VOCAB = 97


def _ids(batch=2, length=9, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _randomise_hycam(model, seed=1, scale=0.3):
    """Non-zero values everywhere (init zeroes W_shared and B_k), so the modulation is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in H.hycam_named_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("site", SITES)
def test_identity_at_init(family, site):
    model = build_backbone(family, VOCAB)
    ids = _ids()
    reference = model(ids).logits
    H.apply_hycam(model, H.HyCAMConfig(site=site))
    model.train()  # Gumbel noise is drawn, but B_k = W_shared = 0 makes A exactly 0
    assert torch.equal(model(ids).logits, reference)
    model.eval()
    assert torch.equal(model(ids).logits, reference)


def _reference_hooks(model, config):
    """The paper's equation written plainly (hycam_ds.modeling.reference), installed as forward
    hooks on the *unwrapped* attention modules (site="ffn": MLPs) of a second copy of the backbone."""
    handles, layer_inputs = [], {}
    for index, (layer, hycam) in enumerate(zip(model.model.layers, config["params"])):

        def capture(module, args, kwargs, index=index):
            layer_inputs[index] = kwargs.get("hidden_states", args[0] if args else None)

        def modulate(module, args, kwargs, output, index=index, p=hycam):
            h_out, _, _ = reference_equation(
                p,
                kwargs["hidden_states"] if "hidden_states" in kwargs else args[0],
                output[0] if isinstance(output, tuple) else output,
                layer_inputs[index],
                tau=config["tau"],
                scale=config["scale"],
                site=config["site"],
            )
            return (h_out, *output[1:]) if isinstance(output, tuple) else h_out

        wrapped = layer.mlp if config["site"] == "ffn" else layer.self_attn
        handles.append(layer.register_forward_pre_hook(capture, with_kwargs=True))
        handles.append(wrapped.register_forward_hook(modulate, with_kwargs=True))
    return handles


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("shared,bias", [(True, False), (False, True)])
def test_matches_reference_equation(family, site, shared, bias):
    cfg = H.HyCAMConfig(site=site, shared=shared, bias=bias)
    plain = build_backbone(family, VOCAB)
    model = H.apply_hycam(build_backbone(family, VOCAB), cfg)
    _randomise_hycam(model)
    params = []
    for layer in hycam_layers(model):
        params.append({name: p.detach().clone() for name, p in layer.named_parameters()})
    _reference_hooks(plain, {"params": params, "tau": cfg.tau, "scale": cfg.scaling, "site": site})
    model.eval(), plain.eval()
    ids = _ids()
    expected = plain(ids).logits
    actual = model(ids).logits
    backbone = build_backbone(family, VOCAB)(ids).logits
    assert not torch.allclose(expected, backbone, atol=1e-3), "modulation must be visible"
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.fixture(params=["fused_cpu", "torch_ops"])
def kernel(request, monkeypatch):
    """Runs a test on both implementations of the layer's modulation: the C++ kernel and torch ops."""
    from hycam_ds.kernels import fused_cpu

    monkeypatch.setenv("HYCAM_FUSED_CPU", "1" if request.param == "fused_cpu" else "0")
    if request.param == "fused_cpu":
        assert fused_cpu.load() is not None, "the fused CPU kernel must build on this machine (it has a C++ compiler)"
    return request.param


def _layer_leaves(t, n, r, d, shared, seed):
    from hycam_ds.kernels.modulation import ProjectionLayout

    g = torch.Generator().manual_seed(seed)
    layout = ProjectionLayout(d, n, r, shared)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()

    # proj scaled so that the router's softmax is neither flat nor saturated
    leaves = dict(
        residual=leaf(t, d),
        target=leaf(t, d),
        proj=leaf(t, layout.width, scale=1.5),
        spec_n=leaf(n, r, r),
        spec_b=leaf(n, r, d),
    )
    noise = torch.randn(t, n, generator=g, dtype=torch.float64)
    return layout, leaves, noise


def _through_balance_term(out, weights, probs, grad_out):
    """A scalar that depends on all three outputs, as the LM loss plus the balance loss does."""
    return (out * grad_out).sum() + 3.0 * (weights.mean(0) * probs.mean(0)).sum()


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("with_shared", [True, False])
@pytest.mark.parametrize("chunk_elements", [1 << 20, 80])
@pytest.mark.parametrize("noisy", [True, False])
def test_fused_modulation_gradients(hard, with_shared, chunk_elements, noisy, kernel, monkeypatch):
    from hycam_ds.kernels import modulation

    monkeypatch.setattr(modulation, "_CPU_CHUNK_ELEMENTS", chunk_elements)  # 80: 2 rows per chunk
    layout, leaves, noise = _layer_leaves(11, 5, 3, 7, with_shared, seed=3)
    noise = noise if noisy else None
    args = (layout, leaves["spec_n"], leaves["spec_b"], noise, 0.6, 1.7, hard)
    ours = modulation.modulate_layer(leaves["residual"], leaves["target"], leaves["proj"], *args)
    ref = reference_modulate_layer(leaves["residual"], leaves["target"], leaves["proj"], *args)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.double(), b)
    grad_out = torch.randn(11, 7, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    grads = [torch.autograd.grad(_through_balance_term(*outs, grad_out), list(leaves.values())) for outs in (ours, ref)]
    torch.testing.assert_close(grads[0], grads[1])
    padding_grad = grads[0][2][:, layout.logit_col + 5 :]
    assert leaves["proj"].shape[1] % 8 == 0 and not padding_grad.any(), "padding gets no gradient"
    if not hard:

        def run(residual, target, proj, spec_n, spec_b):
            return modulation.modulate_layer(residual, target, proj, layout, spec_n, spec_b, noise, 0.6, 1.7, False)

        assert torch.autograd.gradcheck(run, tuple(leaves.values()))


def test_fused_modulation_with_the_target_as_its_own_residual(kernel):
    """site="attention" passes h_att as both residual and target: its gradient is the sum of both."""
    from hycam_ds.kernels import modulation

    layout, leaves, noise = _layer_leaves(9, 4, 2, 6, True, seed=4)

    def run(h, proj, spec_n, spec_b):
        return modulation.modulate_layer(h, h, proj, layout, spec_n, spec_b, noise, 0.5, 0.9, False)

    inputs = (leaves["target"], leaves["proj"], leaves["spec_n"], leaves["spec_b"])
    assert torch.autograd.gradcheck(run, inputs)
    h = leaves["target"]
    ref = reference_modulate_layer(h, h, leaves["proj"], layout, *inputs[2:], noise, 0.5, 0.9, False)
    for a, b in zip(run(*inputs), ref):
        torch.testing.assert_close(a.double(), b)


@pytest.mark.parametrize("routing", ["soft", "hard"])
@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("length", [9, 3])
def test_reference_equals_the_model(routing, site, shared, training, length, kernel):
    """Every HyCAM layer of a float64 model built by apply_hycam computes what
    hycam_ds.modeling.reference states: h_out, routing weights and probs, gradients, balance loss,
    and the same h_out without autograd (the inference path). Eval is noise-free; training draws
    the layer's own Gumbel noise, regenerated here. length 9: 18 token rows, one joint projection;
    length 3: 6 rows, the few-rows projection decoding takes (cpu_gemm.FEW_ROWS)."""
    cfg = H.HyCAMConfig(
        routing=routing, eval_routing="argmax" if routing == "hard" else "softmax", site=site, shared=shared, bias=True
    )
    model = H.apply_hycam(build_backbone("tiny-llama", VOCAB, dtype=torch.float64), cfg)
    _randomise_hycam(model)
    model.train(training)
    seen = {}
    for layer in hycam_layers(model):
        layer.register_forward_hook(lambda module, args, out: seen.__setitem__(module, (args, out)))
    model(_ids(length=length))
    hard = routing == "hard"
    tight = dict(atol=1e-10, rtol=1e-10)
    expected_balance = 0.0
    for layer in hycam_layers(model):
        (x, h_att, h_in), out = seen[layer]
        noise = None
        if training:
            generator = hycam_state(model).noise.generator(layer.layer_index, x.device)
            noise = gumbel_noise((x.shape[0] * x.shape[1], cfg.num_specialized), generator, x.device)
            noise = noise.view(*x.shape[:-1], -1)
        expected, weights, probs = reference_modulation(layer, x, h_att, h_in, noise=noise, hard=hard)
        torch.testing.assert_close(out, expected, **tight)
        torch.testing.assert_close(layer.last_routing["weights"], weights, **tight)
        torch.testing.assert_close(layer.last_routing["probs"], probs, **tight)
        expected_balance += reference_balance_loss(weights, probs).item()
        with torch.no_grad():
            torch.testing.assert_close(layer(x, h_att, h_in), expected, **tight)
        # Gradients: the layer called again on the same inputs (same noise: the counter advances
        # once per model forward) against the reference, through the output and the balance term.
        inputs = [t.detach().clone().requires_grad_() for t in (x, h_att, h_in) if t is not None]
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
        leaves = inputs + list(layer.parameters())
        fast = (layer(*inputs), layer.last_routing["weights"], layer.last_routing["probs"])
        plain = reference_modulation(layer, *inputs, noise=noise, hard=hard)
        grads = [torch.autograd.grad(_through_balance_term(*outs, grad_out), leaves) for outs in (fast, plain)]
        torch.testing.assert_close(grads[0], grads[1], **tight)
    # balance_loss reads the weights in float32: float32 tolerance.
    assert H.balance_loss(model).item() == pytest.approx(expected_balance, rel=1e-6)


@pytest.mark.parametrize("site", ["attention", "ffn"])
def test_training_changes_only_hycam_and_router_learns(site):
    model = H.apply_hycam(build_backbone("tiny-llama", VOCAB), H.HyCAMConfig(balance_weight=0.0, site=site))
    backbone_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".hycam." not in n}
    hycam_before = {n: p.detach().clone() for n, p in H.hycam_named_parameters(model)}
    trainable = {id(p) for p in H.hycam_parameters(model)}
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad}
    assert len(trainable) == len(hycam_before) > 0
    optimizer = torch.optim.AdamW(H.hycam_parameters(model), lr=1e-2)
    model.train()
    router_grads = []
    for step in range(3):
        ids = _ids(seed=step)
        loss = model(ids, labels=ids).loss  # LM loss only: the router must learn from it
        loss.backward()
        router_grads.append(sum(layer.router_weight.grad.abs().sum().item() for layer in hycam_layers(model)))
        optimizer.step()
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        if ".hycam." not in name:
            assert torch.equal(p, backbone_before[name]), f"backbone parameter {name} changed"
    for name, p in H.hycam_named_parameters(model):
        assert not torch.equal(p, hycam_before[name]), f"HyCAM parameter {name} did not train"
    assert router_grads[-1] > 0


def test_untrained_router_option_freezes_router():
    model = H.apply_hycam(build_backbone("tiny-llama", VOCAB), H.HyCAMConfig.authors_code())
    names = {n for n, p in H.hycam_named_parameters(model) if p.requires_grad}
    assert names and not any("router" in n for n in names)
    assert len(H.hycam_parameters(model, trainable_only=False)) > len(names)


def test_balance_loss_hand_computed():
    """Router with zero weights and bias b = log(1..5): logits are b for every token, so in eval
    mode p = softmax(b / 0.5) = k^2 / 55 and softmax(b) = k / 15: per layer sum_k k^3 / 825."""
    model = H.apply_hycam(build_backbone("tiny-llama", VOCAB), H.HyCAMConfig(bias=True))
    with torch.no_grad():
        for layer in hycam_layers(model):
            layer.router_weight.zero_()
            layer.router_bias.copy_(torch.log(torch.arange(1.0, 6.0)))
    model.eval()
    model(_ids())
    expected = 2 * sum(k**3 for k in range(1, 6)) / (15 * 55)
    assert H.balance_loss(model).item() == pytest.approx(expected, rel=1e-6)


def test_balance_loss_ignores_padding():
    model = H.apply_hycam(build_backbone("tiny-llama", VOCAB))
    _randomise_hycam(model)
    model.eval()
    ids = _ids(batch=2, length=8)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    model(ids, attention_mask=mask)
    # Hand computation from the stored per-token routing, real tokens only.
    expected = 0.0
    for layer in hycam_layers(model):
        w = layer.last_routing["weights"][mask.bool()]
        p = torch.softmax(layer.last_routing["logits"], -1)[mask.bool()]
        expected += sum(w[:, k].mean().item() * p[:, k].mean().item() for k in range(w.shape[1]))
    assert H.balance_loss(model).item() == pytest.approx(expected, rel=1e-5)
    # Padding content must not matter: other tokens in the padded positions, same loss.
    other = ids.clone()
    other[1, 5:] = (other[1, 5:] + 13) % VOCAB
    model(other, attention_mask=mask)
    assert H.balance_loss(model).item() == pytest.approx(expected, rel=1e-5)
    # Segment ids (packed rows, 0 = padding) give the same exclusion.
    segment_ids = mask.clone()
    assert H.balance_loss(model, segment_ids=segment_ids).item() == pytest.approx(expected, rel=1e-5)
    unmasked = H.balance_loss(model, token_mask=torch.ones_like(mask)).item()
    assert unmasked != pytest.approx(expected, rel=1e-5)


def test_eval_is_deterministic_and_training_samples():
    model = H.apply_hycam(build_backbone("tiny-llama", VOCAB))
    _randomise_hycam(model)
    ids = _ids()
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)
    model.train()
    first, second = model(ids).logits, model(ids).logits
    assert not torch.equal(first, second), "training must draw fresh Gumbel noise per forward"
    sampling = H.apply_hycam(build_backbone("tiny-llama", VOCAB), H.HyCAMConfig(eval_routing="sample"))
    _randomise_hycam(sampling)
    sampling.eval()
    assert not torch.equal(sampling(ids).logits, sampling(ids).logits)


def test_hard_routing_uses_one_expert_per_token():
    model = H.apply_hycam(build_backbone("tiny-llama", VOCAB), H.HyCAMConfig(routing="hard", eval_routing="argmax"))
    _randomise_hycam(model)
    model.eval()
    model(_ids())
    stats = H.routing_stats(model)
    for layer in stats:
        assert sum(layer["top_fraction"]) == pytest.approx(1.0)
        assert 0 < layer["entropy"] <= math.log(5) + 1e-6


def test_routing_stats_fields():
    model = H.apply_hycam(build_backbone("tiny-qwen2", VOCAB))
    _randomise_hycam(model)
    model.train()
    model(_ids())
    stats = H.routing_stats(model)
    assert [s["layer"] for s in stats] == [0, 1]
    for s in stats:
        assert len(s["expert_prob"]) == 5 and sum(s["expert_prob"]) == pytest.approx(1.0, rel=1e-5)
        assert s["shared_magnitude"] > 0 and s["specialized_magnitude"] > 0


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen2"])
def test_generate_with_cache_equals_without(family):
    model = H.apply_hycam(build_backbone(family, VOCAB), H.HyCAMConfig())
    _randomise_hycam(model, scale=0.5)
    model.eval()
    prompt = _ids(batch=2, length=5)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with_cache = model.generate(prompt, use_cache=True, **kwargs)
    without_cache = model.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.shape == (2, 13)
    assert torch.equal(with_cache, without_cache)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_same_gradients(use_reentrant):
    """Checkpointing re-runs attention in backward: the Gumbel noise must be the same again."""

    def grads(checkpointing, with_balance):
        model = H.apply_hycam(build_backbone("tiny-llama", VOCAB), H.HyCAMConfig(site="residual"))
        _randomise_hycam(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            model.enable_input_require_grads()
        model.train()
        ids = _ids()
        loss = model(ids, labels=ids).loss
        if with_balance:
            loss = loss + H.balance_loss(model)
        loss.backward()
        return {n: p.grad.clone() for n, p in H.hycam_named_parameters(model)}

    with_balance = not use_reentrant
    plain, checkpointed = grads(False, with_balance), grads(True, with_balance)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_reentrant_checkpointing_with_balance_loss_is_a_clear_error():
    """Reentrant checkpointing runs the forward under no_grad: the balance loss would silently
    not train the router. It must say so instead."""
    model = H.apply_hycam(build_backbone("tiny-llama", VOCAB))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    model.train()
    ids = _ids()
    model(ids, labels=ids)
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        H.balance_loss(model)


def test_bf16_forward_backward():
    model = H.apply_hycam(build_backbone("tiny-llama", VOCAB, dtype=torch.bfloat16))
    _randomise_hycam(model, scale=0.1)
    assert all(p.dtype == torch.bfloat16 for p in H.hycam_parameters(model))
    model.train()
    ids = _ids()
    loss = model(ids, labels=ids).loss + H.balance_loss(model)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in H.hycam_parameters(model))
    reference = H.apply_hycam(build_backbone("tiny-llama", VOCAB))
    _randomise_hycam(reference, scale=0.1)
    model.eval(), reference.eval()
    torch.testing.assert_close(model(ids).logits.float(), reference(ids).logits, atol=0.1, rtol=0.05)


def test_unsupported_model_type_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"model_type='gpt2'.*supported: \['llama', 'mistral', 'qwen2', 'qwen3'\]"):
        H.apply_hycam(model, H.HyCAMConfig())


def test_config_validation():
    with pytest.raises(ValueError, match="routing"):
        H.HyCAMConfig(routing="top2")
    with pytest.raises(ValueError, match="num_specialized"):
        H.HyCAMConfig(num_specialized=-1)
    with pytest.raises(ValueError, match="no modulation"):
        H.HyCAMConfig(num_specialized=0, shared=False)
    with pytest.raises(ValueError, match="tau"):
        H.HyCAMConfig(tau=0)
    with pytest.raises(ValueError, match="unknown field"):
        H.HyCAMConfig.from_dict({"rnak": 4})


def test_shared_cam_alone_baseline():
    """num_specialized=0 is the "cam" baseline: h + h * SiLU(x W_shared), no router."""
    cfg = H.HyCAMConfig(num_specialized=0)
    plain = build_backbone("tiny-llama", VOCAB)
    model = H.apply_hycam(build_backbone("tiny-llama", VOCAB), cfg)
    _randomise_hycam(model)
    names = [n.split(".")[-1] for n, _ in H.hycam_named_parameters(model)]
    assert set(names) == {"shared_weight"}
    params = [{n: p.detach().clone() for n, p in layer.named_parameters()} for layer in hycam_layers(model)]
    _reference_hooks(plain, {"params": params, "tau": 1.0, "scale": 1.0, "site": "attention"})
    ids = _ids()
    model.eval(), plain.eval()
    torch.testing.assert_close(model(ids).logits, plain(ids).logits, atol=1e-5, rtol=1e-5)
    assert H.balance_loss(model).item() == 0.0


def test_disable_hycam_gives_the_backbone():
    plain = build_backbone("tiny-llama", VOCAB).eval()
    model = H.apply_hycam(build_backbone("tiny-llama", VOCAB)).eval()
    _randomise_hycam(model)
    ids = _ids()
    with H.disable_hycam(model):
        assert torch.equal(model(ids).logits, plain(ids).logits)
    assert not torch.allclose(model(ids).logits, plain(ids).logits)
