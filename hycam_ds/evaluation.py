"""Held-out evaluation: per-task perplexity on response tokens (packed rows), BLEU-4 / ROUGE-L of
batched greedy generations, perplexity on general text (knowledge retention), task x expert
routing. Every function runs on every rank with the same number of forwards (ZeRO-3 gathers
parameters collectively) and reduces its sums; with one process it is plain PyTorch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from .injection import hycam_layers
from .lm_loss import packed_token_losses
from .text_metrics import bleu4, perplexity, rouge_l


@dataclass
class EvalSettings:
    split: str = "test"
    """Which split of the data build to evaluate."""
    max_examples_per_task: Optional[int] = 32
    """Generation examples per task (the first ones in storage order; None = all)."""
    max_new_tokens: int = 96
    """Greedy generation length cap."""
    batch_size: int = 8
    """Prompts per generate() call and packed rows per perplexity forward."""
    max_ppl_rows: Optional[int] = None
    """Packed rows of the split whose perplexity is measured: the first ones (rank r of W reads
    rows r, r+W, ...), rounded up to whole batches on every rank; None = the whole split."""
    general_text: Optional[str] = None
    """Directory of .txt files for knowledge retention (general-text perplexity); None = skip."""
    general_max_tokens: int = 40_000
    """Tokens of general text evaluated (the first ones, deterministic)."""
    general_seq_len: int = 256
    """Block length of the general-text perplexity."""


def ppl_batches(batches: list, settings: EvalSettings, world: int) -> list:
    """The batches a rank evaluates for perplexity under `settings.max_ppl_rows`."""
    if settings.max_ppl_rows is None:
        return batches
    rows_per_rank = -(-settings.max_ppl_rows // world)
    return batches[: -(-rows_per_rank // settings.batch_size)]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    if _world()[1] > 1:
        dist.all_reduce(tensor)
    return tensor


def _all_reduce_max(value: int) -> int:
    tensor = torch.tensor([value], dtype=torch.int64)
    if _world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor[0])


def padding_batch(batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Padding only (no loss tokens): what a rank with fewer batches runs to keep step with the others."""
    zeros = torch.zeros((batch_size, seq_len), dtype=torch.int64)
    return {"input_ids": zeros, "labels": torch.full_like(zeros, -100), "position_ids": zeros,
            "segment_ids": zeros, "task_ids": torch.full_like(zeros, -1)}


def task_losses(forward, module, batches: list[dict], n_tasks: int, batch_size: int, seq_len: int, device,
                progress: Callable = lambda it, **kw: it) -> tuple[torch.Tensor, dict[int, np.ndarray] | None]:
    """Sum of response-token losses and token counts per task ([n_tasks, 2], reduced over ranks),
    and for HyCAM the task x expert mean routing weight per layer."""
    rounds = _all_reduce_max(len(batches))
    layers = [layer for layer in hycam_layers(module) if layer.router_weight is not None]
    n_experts = layers[0].config.num_specialized if layers else 0  # not the weight's shape: ZeRO-3 partitions it
    sums = torch.zeros(n_tasks, 2, dtype=torch.float64)
    routing = torch.zeros(len(layers), n_tasks, n_experts + 1, dtype=torch.float64)
    with torch.no_grad():
        for i in progress(range(rounds), desc="perplexity", leave=False):
            real = i < len(batches)
            batch = batches[i] if real else padding_batch(batch_size, seq_len)
            losses, mask = packed_token_losses(forward, batch, device)
            if not real:
                continue
            tasks = batch["task_ids"][:, 1:].to(losses.device)[mask]
            sums[:, 0] += torch.bincount(tasks, weights=losses[mask].double(), minlength=n_tasks).cpu()
            sums[:, 1] += torch.bincount(tasks, minlength=n_tasks).double().cpu()
            task_ids = batch["task_ids"].reshape(-1)
            keep = task_ids >= 0
            for index, layer in enumerate(layers):
                weights = layer.last_routing["weights"].detach().reshape(-1, n_experts).double().cpu()
                routing[index, :, :-1].index_add_(0, task_ids[keep], weights[keep])
                routing[index, :, -1] += torch.bincount(task_ids[keep], minlength=n_tasks).double()
    sums = all_reduce_sum(sums)
    if not layers:
        return sums, None
    routing = all_reduce_sum(routing)
    return sums, {index: (routing[index, :, :-1] / routing[index, :, -1:].clamp_min(1)).numpy() for index in range(len(layers))}


def generation_examples(data_dir: Path, split: str, tasks: list[str], limit: Optional[int]) -> list[dict]:
    """The first `limit` documents of each task (deterministic, the same list on every rank).

    Each carries `end_of_turn_id`: the token a response of this build ends with when it is not EOS
    (a chat template's end-of-turn, from the manifest), None for alpaca builds."""
    from data_pipeline import iter_documents, load_manifest, manifest_template

    end_of_turn = manifest_template(load_manifest(data_dir)).get("end_of_turn_id")
    taken = {t: 0 for t in range(len(tasks))}
    examples = []
    for doc in iter_documents(data_dir, split):
        task = doc["task_id"]
        if limit is None or taken[task] < limit:
            taken[task] += 1
            examples.append({**doc, "end_of_turn_id": end_of_turn})
    return examples


def stop_ids(tokenizer, examples: list[dict]) -> list[int]:
    """Tokens that end a generation: EOS, and the chat end-of-turn token the examples' build used."""
    ids = {tokenizer.eos_token_id} | {e.get("end_of_turn_id") for e in examples}
    return sorted(i for i in ids if i is not None)


def _until_stop(ids: list[int], stops: list[int]) -> list[int]:
    """`ids` up to its first stop token: an end-of-turn token that is not flagged special would
    otherwise survive decoding with skip_special_tokens."""
    cut = next((i for i, token in enumerate(ids) if token in stops), len(ids))
    return ids[:cut]


def generate_texts(model, tokenizer, examples: list[dict], settings: EvalSettings, device, synced: bool,
                   progress: Callable = lambda it, **kw: it) -> list[tuple[int, str, str]]:
    """Greedy generations for this rank's share of `examples`: (example index, hypothesis, reference).

    Left-padded batches, the KV cache, deterministic routing (the model is in eval mode). Every rank
    makes the same number of generate() calls; `synced` (ZeRO-3 across ranks) keeps them in
    lockstep until all are done (transformers' synced_gpus). Generation stops at EOS or at the chat
    end-of-turn token the examples carry (`generation_examples`); hypotheses and references are
    decoded up to it, special tokens skipped."""
    rank, world = _world()
    mine = [i for i in range(len(examples)) if i % world == rank]
    calls = _all_reduce_max(math.ceil(len(mine) / settings.batch_size))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_ids(tokenizer, examples)
    results = []
    for call in progress(range(calls), desc="generate", leave=False):
        chunk = mine[call * settings.batch_size:(call + 1) * settings.batch_size]
        real = bool(chunk)
        chunk = chunk or [0]  # a rank without work still takes part in the collective forwards
        prompts = [examples[i]["tokens"][: examples[i]["loss_start"]] for i in chunk]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
        attention = torch.zeros((len(prompts), width), dtype=torch.int64)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt):] = torch.as_tensor(prompt)
            attention[row, width - len(prompt):] = 1
        with torch.no_grad():
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), do_sample=False,
                                    max_new_tokens=settings.max_new_tokens, pad_token_id=pad_id,
                                    eos_token_id=stops, synced_gpus=synced)
        if not real:
            continue
        for row, index in enumerate(chunk):
            hypothesis = tokenizer.decode(_until_stop(output[row, width:].tolist(), stops), skip_special_tokens=True).strip()
            example = examples[index]
            reference = example["tokens"][example["loss_start"]:].tolist()
            reference = tokenizer.decode(_until_stop(reference, stops), skip_special_tokens=True).strip()
            results.append((index, hypothesis, reference))
    return results


def gather_generations(results: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """Every rank's generations, ordered by example index (identical on every rank)."""
    rank, world = _world()
    if world == 1:
        return sorted(results)
    everything: list = [None] * world
    dist.all_gather_object(everything, results)  # between our own ranks: nothing untrusted
    return sorted(item for part in everything for item in part)


def generation_scores(generations: list[tuple[int, str, str]], examples: list[dict], tasks: list[str]) -> dict[str, dict]:
    by_task: dict[str, tuple[list, list]] = {t: ([], []) for t in tasks}
    for index, hypothesis, reference in generations:
        hyps, refs = by_task[tasks[examples[index]["task_id"]]]
        hyps.append(hypothesis)
        refs.append(reference)
    return {t: {"bleu4": bleu4(h, r), "rougeL": rouge_l(h, r), "examples": len(h)} for t, (h, r) in by_task.items() if h}


def general_text_blocks(tokenizer, text_dir: str, max_tokens: int, seq_len: int) -> torch.Tensor:
    """The first `max_tokens` tokens of the sorted .txt files, as [blocks, seq_len] rows."""
    ids: list[int] = []
    for path in sorted(Path(text_dir).rglob("*.txt")):
        for line in path.read_text(errors="replace").splitlines():
            if line.strip():
                ids.extend(tokenizer.encode(line.strip(), add_special_tokens=False) + [tokenizer.eos_token_id])
            if len(ids) >= max_tokens:
                break
        if len(ids) >= max_tokens:
            break
    blocks = len(ids) // seq_len
    if blocks == 0:
        raise ValueError(f"{text_dir}: fewer than {seq_len} tokens of text")
    return torch.tensor(ids[: blocks * seq_len], dtype=torch.int64).view(blocks, seq_len)


def general_perplexity(forward, blocks: torch.Tensor, batch_size: int, device) -> float:
    """Perplexity of contiguous text blocks, split across ranks, reduced."""
    rank, world = _world()
    mine = blocks[rank::world]
    calls = _all_reduce_max(math.ceil(len(mine) / batch_size))
    sums = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for call in range(calls):
            chunk = mine[call * batch_size:(call + 1) * batch_size]
            real = len(chunk) > 0
            chunk = chunk if real else blocks[:1]
            logits = forward(input_ids=chunk.to(device), use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), chunk[:, 1:].to(device), reduction="sum")
            if real:
                sums += torch.tensor([float(loss), chunk[:, 1:].numel()], dtype=torch.float64)
    sums = all_reduce_sum(sums)
    return perplexity(float(sums[0]), float(sums[1]))
