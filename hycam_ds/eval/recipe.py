"""The evaluation recipe: a backbone plus what was trained on it, measured per task on a held-out
split, and general-text perplexity with and without the adaptation (knowledge retention).

`evaluate` runs on every rank (ZeRO-3 partitions the model, examples are split across ranks and
the results reduced: the numbers equal one process's); `write` turns its result into report.json,
report.md and figures on rank 0. launch/evaluate.py is the command line around the two."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Optional

from ..engine.distributed import rank_and_world
from ..engine.ds_config import zero_stage
from ..engine.lm_loss import perplexity, task_losses
from ..engine.run_dir import RunDir, RunDirError
from ..modeling.injection import disable_hycam
from .generation import gather_generations, generate_texts, generation_examples, generation_scores
from .loading import ModelSpec, load_model
from .perplexity import general_perplexity, general_text_blocks, ppl_batches
from .precision import dtype_name, placement
from .settings import EvalSettings

MAX_SAMPLES = 50
"""Generations written to samples.json (the first ones by example index)."""


def run_model_spec(run_dir: Path) -> tuple[ModelSpec, Path, Any]:
    """(ModelSpec, data directory, tokenizer) of a launch/train.py run directory, wherever it is now:
    the paths run_info.json records inside the run are resolved against it. The data directory is
    returned as recorded, present or not (evaluate() says what to do when it is gone)."""
    from data_pipeline import load_tokenizer

    info = RunDir(run_dir).read_info()
    source = info.tokenizer_source()
    if source.startswith(("/", ".")) and not Path(source).exists():
        raise RunDirError(
            f"{run_dir}: its tokenizer {source} is gone (it lived in the data build, which was moved or "
            "deleted, and this run directory predates its own copy in RUN/tokenizer); rebuild the data "
            "there, or evaluate with --backbone-name/--backbone, --adapter and --data"
        )
    tokenizer = load_tokenizer(source)
    return ModelSpec.from_run_dir(Path(run_dir), len(tokenizer)), Path(info.data_dir), tokenizer


def model_spec(
    run_dir: Optional[str] = None,
    *,
    backbone: Optional[str] = None,
    backbone_name: Optional[str] = None,
    backbone_seed: int = 0,
    adapter: Optional[str] = None,
    full_model: Optional[str] = None,
    tokenizer: Optional[str] = None,
) -> tuple[ModelSpec, Optional[Path], Any]:
    """(ModelSpec, data directory or None, tokenizer) as the evaluation and generation commands name a
    model: a run directory, or a backbone (directory / .gguf / hub id, or one built in code) with an
    adapter, or a fully fine-tuned model. `tokenizer` is loaded when given, else the full model's or
    the backbone's own."""
    from data_pipeline import load_tokenizer

    if run_dir:
        return run_model_spec(Path(run_dir))
    source = tokenizer or full_model or backbone
    if source is None:
        raise ValueError(f"backbone {backbone_name!r} is built in code and has no tokenizer: name one")
    loaded = load_tokenizer(source)
    spec = ModelSpec(
        backbone_path=backbone,
        backbone_name=backbone_name,
        backbone_seed=backbone_seed,
        vocab_size=len(loaded),
        adapter=adapter,
        full_model=full_model,
    )
    return spec, None, loaded


def check_data_dir(data_dir: Path) -> None:
    """RunDirError naming the way out when the data build to evaluate on is gone."""
    if not (Path(data_dir) / "manifest.json").is_file():
        raise RunDirError(
            f"{data_dir}: the data build is gone (no manifest.json: moved or deleted); pass --data DIR "
            "with a build of the same recipe and tokenizer, or rebuild it (python -m data_pipeline build)"
        )


def backbone_view(model, kind: str):
    """A context in which `model` computes its untouched backbone (None when that needs another model)."""
    if kind == "hycam":
        return disable_hycam(model)
    if kind == "lora":
        return model.disable_adapter()
    if kind == "backbone":
        return contextlib.nullcontext()
    return None


def evaluate(
    spec: ModelSpec,
    data_dir: Path,
    tokenizer,
    settings: EvalSettings,
    ds_config: Optional[dict] = None,
    samples_dir: Optional[Path] = None,
    progress: Callable = lambda it, **kw: it,
) -> dict:
    """Measures `spec` on `data_dir`'s split: {"report": ..., "routing": task x expert per layer or None}.
    Rank 0 writes the first generations to samples_dir/samples.json."""
    from data_pipeline import ShardReader, tokenizer_fingerprint

    rank, world = rank_and_world()
    check_data_dir(data_dir)
    zero3 = ds_config is not None and zero_stage(ds_config) == 3
    synced = world > 1 and zero3
    device, dtype = placement(settings.dtype, settings.device, zero3)
    model, keepalive = load_model(spec, dtype, ds_config, device=device)
    device = next(model.parameters()).device  # under ZeRO-3, where DeepSpeed put this rank
    reader = ShardReader(
        data_dir,
        settings.split,
        rank,
        world,
        settings.batch_size,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        drop_last=False,
    )
    sums, routing = task_losses(
        model,
        model,
        ppl_batches(list(reader), settings, world),
        len(reader.tasks),
        settings.batch_size,
        reader.seq_len,
        device,
        progress,
    )
    tasks = {
        t: {"ppl": perplexity(float(sums[i, 0]), float(sums[i, 1])), "loss_tokens": int(sums[i, 1])}
        for i, t in enumerate(reader.tasks)
    }
    if settings.max_examples_per_task != 0:
        examples = generation_examples(data_dir, settings.split, reader.tasks, settings.max_examples_per_task)
        generations = gather_generations(generate_texts(model, tokenizer, examples, settings, device, synced, progress))
        for task, scores in generation_scores(generations, examples, reader.tasks).items():
            tasks[task].update(scores)
        if rank == 0 and samples_dir is not None:
            samples = [
                {"task": reader.tasks[examples[i]["task_id"]], "hypothesis": h, "reference": r}
                for i, h, r in generations[:MAX_SAMPLES]
            ]
            samples_dir.mkdir(parents=True, exist_ok=True)
            (samples_dir / "samples.json").write_text(json.dumps(samples, indent=2))
    report = {
        "split": settings.split,
        "model": {"kind": spec.kind(), **vars(spec)},
        "tasks": tasks,
        "world_size": world,
        "max_ppl_rows": settings.max_ppl_rows,
        "dtype": dtype_name(dtype),
    }
    if settings.general_text:
        report["general_text"] = _general_text(model, spec, tokenizer, settings, ds_config, device, dtype)
    del keepalive
    return {"report": report, "routing": routing.by_layer() if routing is not None else None}


def _general_text(model, spec: ModelSpec, tokenizer, settings: EvalSettings, ds_config, device, dtype) -> dict:
    """General-text perplexity of the adapted model and of the backbone it started from."""
    blocks = general_text_blocks(
        tokenizer, settings.general_text, settings.general_max_tokens, settings.general_seq_len
    )
    adapted = general_perplexity(model, blocks, settings.batch_size, device)
    view = backbone_view(model, spec.kind())
    if view is not None:
        with view:
            original = general_perplexity(model, blocks, settings.batch_size, device)
    else:  # a fully fine-tuned model: load the backbone it started from
        base_spec = ModelSpec(
            backbone_path=spec.backbone_path,
            backbone_name=spec.backbone_name,
            backbone_seed=spec.backbone_seed,
            vocab_size=spec.vocab_size,
        )
        base, _base_keepalive = load_model(base_spec, dtype, ds_config, device=device)
        original = general_perplexity(base, blocks, settings.batch_size, device)
    return {"ppl": adapted, "backbone_ppl": original, "tokens": int(blocks.numel()), "source": settings.general_text}


def write(result: dict, out: Path) -> str:
    """report.json, report.md and figures from `evaluate`'s result (rank 0); returns the Markdown table."""
    from .reports import averages, markdown_table, write_report

    report = result["report"]
    report["average"] = averages(report["tasks"])
    write_report(report, out, result["routing"])
    return markdown_table(report)
