"""Typed experiment configuration of the trainer, mirrored by the YAML files in launch/configs/.

A YAML file sets any subset of the fields; `key=value` arguments override them
(`optim.lr=3e-4`, `hycam.num_specialized=3`, `data.dir=runs/data/x`). Every value is checked
here, before any model or data is touched, and an error names the field.
With no file at all, the defaults train the embedded default: a small Llama built in code on
the generated five-task corpus, in a few minutes on two CPU cores.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from data_pipeline.typed_config import TypedConfigError, apply_overrides, build_dataclass, read_yaml_mapping

from ..modeling.backbones import SMALL_BACKBONES
from ..modeling.config import HyCAMConfig


class ConfigError(TypedConfigError):
    """An invalid experiment configuration; the message names the field."""


@dataclass
class ModelConfig:
    name: str = "small-llama"
    """A small backbone built in code (hycam_ds.modeling.backbones.SMALL_BACKBONES); used when `path` is unset."""
    path: Optional[str] = None
    """A Hugging Face backbone: a local directory, a .gguf file or a hub id `org/name[@revision]`,
    loaded with from_pretrained (data_pipeline.pretrained says how each is read)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (non-reentrant), for long sequences or big backbones."""
    attn_implementation: str = "sdpa"
    """Attention kernel; packed rows need one that takes a 4-D mask (sdpa, eager)."""
    seed: int = 0
    """Initialisation seed of a backbone built in code."""


@dataclass
class LoraSettings:
    r: int = 8
    """LoRA rank (method=lora)."""
    alpha: float = 16.0
    """LoRA alpha."""
    dropout: float = 0.0
    """LoRA dropout."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Modules LoRA adapts."""


@dataclass
class DataConfig:
    dir: Optional[str] = None
    """A built data directory (python -m data_pipeline build). Unset: build `recipe` into `cache_dir`."""
    recipe: str = "data_pipeline/recipes/embedded.yaml"
    """Recipe to build when `dir` is unset (rank 0 builds, the others wait)."""
    data_root: Optional[str] = None
    """Directory the recipe's file paths are relative to (e.g. ../shared/data)."""
    cache_dir: str = "runs/data"
    """Where recipes are built when `dir` is unset, one subdirectory per recipe and settings."""
    seq_len: int = 256
    """Packed sequence length used when building."""
    vocab_size: int = 3000
    """Vocabulary of the SentencePiece tokenizer trained at build time (backbones built in code)."""
    template: Optional[Literal["alpaca", "chat"]] = None
    """The prompt format the run expects (data_pipeline.template); None accepts the built data's.
    A build from `recipe` uses it as the recipe's override (chat needs model.path: a backbone whose
    tokenizer has a chat template)."""
    task_sampling: Literal["mixture", "temperature", "sequential"] = "mixture"
    """How the reader picks tasks: recipe mixture weights, size**(1/temperature), or plain epochs."""
    temperature: float = 1.0
    """Temperature for task_sampling=temperature."""
    seed: int = 1234
    """Shuffling seed of the reader."""


@dataclass
class OptimConfig:
    max_steps: int = 300
    """Optimizer steps of the whole run (the learning-rate schedule spans them)."""
    stop_at_step: Optional[int] = None
    """End this job early at this step, with a checkpoint, as a time-boxed job would; resume continues."""
    micro_batch_size: int = 4
    """Packed rows per rank per forward."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 2e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak (cosine decay)."""
    warmup_steps: int = 10
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping (0 = off)."""
    max_bad_steps: int = 5
    """Consecutive steps with a non-finite loss or gradient (each skipped, weights unchanged)
    after which training stops, having saved a checkpoint of the last good weights."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto = bf16 on GPUs that have it, fp32 otherwise (CPUs here emulate bf16 ~30x slower)."""
    seed: int = 0
    """Seed of python/numpy/torch RNGs and of the Gumbel noise (offset by rank)."""


@dataclass
class LoggingConfig:
    log_every: int = 1
    """Steps between metrics lines / TensorBoard points."""
    eval_every: int = 100
    """Steps between held-out evaluations (0 = only at the end)."""
    eval_batches: Optional[int] = None
    """Cap on eval batches per rank (None = the whole eval split)."""
    tensorboard: bool = True
    """Write TensorBoard event files under run_dir/tensorboard (rank 0)."""
    progress: bool = True
    """Progress on rank 0: a tqdm bar on a terminal, a log line per 5% of the run otherwise (batch jobs)."""
    collapse_threshold: float = 0.9
    """Routing collapse: one expert is the top choice of more than this fraction of tokens ..."""
    collapse_patience: int = 20
    """... for this many consecutive logged steps."""
    weights_checksum: bool = False
    """Debugging: log train/weights_checksum, the sum of every trainable value over all ranks, each
    step (a skipped step leaves it unchanged). Costs a pass over the trainable parameters per step."""


@dataclass
class CheckpointConfig:
    save_every: int = 100
    """Steps between checkpoints (0 = only at the end)."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted after a newer one is in place."""
    resume: str = "none"
    """none | auto (latest complete checkpoint of run_dir, if any) | a checkpoint directory."""
    overwrite: bool = False
    """Start over in a run_dir that already holds a run: its files (config, metrics, TensorBoard,
    checkpoints, tokenizer, adapter) move to run_dir/archive/run-TIME/, never deleted. Without it
    such a run_dir is refused unless `resume` continues the run (hycam_ds.engine.run_dir)."""
    durable: bool = True
    """Each rank fsyncs the files it wrote before the checkpoint is published, so a published
    checkpoint survives a node crash or power loss. False skips the wait, as DeepSpeed's own save
    does: saves return once the bytes are in the page cache (faster where the disk is slower than
    the save); a checkpoint torn by a crash soon after is still caught by its manifest at resume,
    which then names the newest intact checkpoint."""
    export_adapter: bool = True
    """Write run_dir/adapter at the end (HyCAM/CAM: save_adapter; LoRA: PEFT; full: the model)."""


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    """Everything of this run goes here: config, logs, TensorBoard, checkpoints, adapter."""
    method: Literal["hycam", "cam", "lora", "full"] = "hycam"
    """hycam = the paper; cam = the shared CAM alone; lora = PEFT LoRA; full = full fine-tuning."""
    model: ModelConfig = field(default_factory=ModelConfig)
    hycam: HyCAMConfig = field(default_factory=HyCAMConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- building
def load_train_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> TrainConfig:
    """YAML file (optional) + key=value overrides -> a validated TrainConfig, its `hycam` section
    resolved for the method (method=cam: the shared CAM alone, see effective_hycam_config). Read with
    data_pipeline's typed loader: duplicate YAML keys, unknown keys, wrong types and non-finite
    numbers are errors naming the field."""
    tree = {} if path is None else read_yaml_mapping(path, label="--config", error=ConfigError)
    apply_overrides(tree, overrides, error=ConfigError)
    config = build_dataclass(TrainConfig, tree, error=ConfigError)
    validate(config)
    config.hycam = effective_hycam_config(config)
    return config


def _positive(value: float, where: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{where}: expected {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def validate(cfg: TrainConfig) -> None:
    """Checks that need no model or data: ranges, files, choices."""
    if not str(cfg.run_dir).strip():  # it would write into the current directory, the repository usually
        raise ConfigError("run_dir: empty; give the run's own directory (e.g. run_dir=runs/my_run)")
    if cfg.checkpoint.overwrite and cfg.checkpoint.resume != "none":
        raise ConfigError(
            f"checkpoint.overwrite=true starts the run over, checkpoint.resume={cfg.checkpoint.resume} "
            "continues it: choose one"
        )
    if cfg.model.path is None and cfg.model.name not in SMALL_BACKBONES:
        raise ConfigError(
            f"model.name: {cfg.model.name!r} is not a built-in backbone ({sorted(SMALL_BACKBONES)}); "
            "set model.path for a Hugging Face one"
        )
    if cfg.model.attn_implementation not in ("sdpa", "eager"):
        raise ConfigError(
            f"model.attn_implementation: {cfg.model.attn_implementation!r}: "
            "packed rows need a 4-D mask, use sdpa or eager"
        )
    if cfg.data.dir is not None and not (Path(cfg.data.dir) / "manifest.json").is_file():
        raise ConfigError(
            f"data.dir: {cfg.data.dir} holds no manifest.json (build it with python -m data_pipeline build)"
        )
    if cfg.data.dir is None and not Path(cfg.data.recipe).is_file():
        raise ConfigError(f"data.recipe: {cfg.data.recipe}: no such file")
    if cfg.data.data_root is not None and not Path(cfg.data.data_root).is_dir():
        raise ConfigError(f"data.data_root: {cfg.data.data_root}: no such directory")
    if cfg.data.template == "chat" and cfg.data.dir is None and cfg.model.path is None:
        raise ConfigError(
            "data.template: chat renders with the backbone tokenizer's chat template; a tokenizer trained "
            "here has none: set model.path to an instruction-tuned backbone, or use alpaca"
        )
    for where, value in (
        ("data.seq_len", cfg.data.seq_len),
        ("data.vocab_size", cfg.data.vocab_size),
        ("data.temperature", cfg.data.temperature),
        ("optim.max_steps", cfg.optim.max_steps),
        ("optim.micro_batch_size", cfg.optim.micro_batch_size),
        ("optim.grad_accum", cfg.optim.grad_accum),
        ("optim.lr", cfg.optim.lr),
        ("optim.eps", cfg.optim.eps),
        ("optim.max_bad_steps", cfg.optim.max_bad_steps),
        ("logging.log_every", cfg.logging.log_every),
        ("checkpoint.keep_last", cfg.checkpoint.keep_last),
        ("lora.r", cfg.lora.r),
        ("logging.collapse_patience", cfg.logging.collapse_patience),
    ):
        _positive(value, where)
    for where, value in (
        ("optim.warmup_steps", cfg.optim.warmup_steps),
        ("optim.weight_decay", cfg.optim.weight_decay),
        ("optim.grad_clip", cfg.optim.grad_clip),
        ("logging.eval_every", cfg.logging.eval_every),
        ("checkpoint.save_every", cfg.checkpoint.save_every),
        ("lora.dropout", cfg.lora.dropout),
    ):
        _positive(value, where, allow_zero=True)
    if not 0 <= cfg.optim.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio: expected within [0, 1], got {cfg.optim.min_lr_ratio}")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas: expected two values in [0, 1), got {cfg.optim.betas}")
    if cfg.optim.warmup_steps >= cfg.optim.max_steps:
        raise ConfigError(
            f"optim.warmup_steps: {cfg.optim.warmup_steps} must be below optim.max_steps ({cfg.optim.max_steps})"
        )
    if cfg.optim.stop_at_step is not None and not 0 < cfg.optim.stop_at_step <= cfg.optim.max_steps:
        raise ConfigError(
            f"optim.stop_at_step: {cfg.optim.stop_at_step} must be within 1..optim.max_steps ({cfg.optim.max_steps})"
        )
    if not 0 < cfg.logging.collapse_threshold <= 1:
        raise ConfigError(f"logging.collapse_threshold: expected within (0, 1], got {cfg.logging.collapse_threshold}")
    if cfg.checkpoint.resume not in ("none", "auto") and not Path(cfg.checkpoint.resume).is_dir():
        raise ConfigError(f"checkpoint.resume: {cfg.checkpoint.resume!r} is not none, auto, or a checkpoint directory")
    if cfg.data.dir is None:
        _check_recipe(cfg)
    from .methods import check_backbone  # last: it reads the backbone's config (a hub id may reach the network)

    check_backbone(cfg)


def _check_recipe(cfg: TrainConfig) -> None:
    """The recipe this run would build loads (typed, its relative paths with a data root), and a
    vocabulary trained here can hold the byte pieces."""
    from data_pipeline import BuildError, load_recipe
    from data_pipeline.tokenizer import MIN_VOCAB_SIZE

    if cfg.model.path is None and cfg.data.vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(
            f"data.vocab_size: {cfg.data.vocab_size} is below {MIN_VOCAB_SIZE}, the smallest vocabulary trained here "
            "(256 byte pieces and the special tokens)"
        )
    try:
        load_recipe(cfg.data.recipe, cfg.data.data_root, root_required=True)
    except BuildError as err:
        raise ConfigError(f"data.recipe: {err}") from None


def effective_hycam_config(cfg: TrainConfig) -> HyCAMConfig:
    """The HyCAM config the method applies: `hycam` as configured, and for method=cam the shared CAM
    alone (no specialised modules, hence nothing to balance)."""
    if cfg.method == "cam":
        return HyCAMConfig.from_dict(
            {**cfg.hycam.to_dict(), "num_specialized": 0, "shared": True, "balance_weight": 0.0}
        )
    return cfg.hycam
