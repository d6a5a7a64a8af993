"""Batched greedy generation on every rank in lockstep, and BLEU-4 / ROUGE-L of its outputs per task."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..engine.distributed import all_reduce_max, rank_and_world
from .metrics import bleu4, rouge_l
from .settings import EvalSettings


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


def generate_texts(
    model,
    tokenizer,
    examples: list[dict],
    settings: EvalSettings,
    device,
    synced: bool,
    progress: Callable = lambda it, **kw: it,
) -> list[tuple[int, str, str]]:
    """Greedy generations for this rank's share of `examples`: (example index, hypothesis, reference).

    Left-padded batches, the KV cache, deterministic routing (the model is in eval mode). Every rank
    makes the same number of generate() calls; `synced` (ZeRO-3 across ranks) keeps them in
    lockstep until all are done (transformers' synced_gpus). Generation stops at EOS or at the chat
    end-of-turn token the examples carry (`generation_examples`); hypotheses and references are
    decoded up to it, special tokens skipped."""
    rank, world = rank_and_world()
    mine = [i for i in range(len(examples)) if i % world == rank]
    calls = all_reduce_max(math.ceil(len(mine) / settings.batch_size))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_ids(tokenizer, examples)
    results = []
    for call in progress(range(calls), desc="generate", leave=False):
        chunk = mine[call * settings.batch_size : (call + 1) * settings.batch_size]
        real = bool(chunk)
        chunk = chunk or [0]  # a rank without work still takes part in the collective forwards
        prompts = [examples[i]["tokens"][: examples[i]["loss_start"]] for i in chunk]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
        attention = torch.zeros((len(prompts), width), dtype=torch.int64)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.as_tensor(prompt)
            attention[row, width - len(prompt) :] = 1
        with torch.no_grad():
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                do_sample=False,
                max_new_tokens=settings.max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=stops,
                synced_gpus=synced,
            )
        if not real:
            continue
        for row, index in enumerate(chunk):
            hypothesis = tokenizer.decode(
                _until_stop(output[row, width:].tolist(), stops), skip_special_tokens=True
            ).strip()
            example = examples[index]
            reference = example["tokens"][example["loss_start"] :].tolist()
            reference = tokenizer.decode(_until_stop(reference, stops), skip_special_tokens=True).strip()
            results.append((index, hypothesis, reference))
    return results


def gather_generations(results: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """Every rank's generations, ordered by example index (identical on every rank)."""
    rank, world = rank_and_world()
    if world == 1:
        return sorted(results)
    everything: list = [None] * world
    dist.all_gather_object(everything, results)  # between our own ranks: nothing untrusted
    return sorted(item for part in everything for item in part)


def generation_scores(
    generations: list[tuple[int, str, str]], examples: list[dict], tasks: list[str]
) -> dict[str, dict]:
    by_task: dict[str, tuple[list, list]] = {t: ([], []) for t in tasks}
    for index, hypothesis, reference in generations:
        hyps, refs = by_task[tasks[examples[index]["task_id"]]]
        hyps.append(hypothesis)
        refs.append(reference)
    return {
        t: {"bleu4": bleu4(h, r), "rougeL": rouge_l(h, r), "examples": len(h)} for t, (h, r) in by_task.items() if h
    }
