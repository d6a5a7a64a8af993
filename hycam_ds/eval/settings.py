"""What an evaluation measures and how much of it: the one source of evaluate.py's defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass
class EvalSettings:
    split: str = "test"
    """Which split of the data build to evaluate."""
    max_examples_per_task: Optional[int] = 32
    """Generation examples per task (the first ones in storage order; None = all, 0 = no generation)."""
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
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """The model's precision: auto = bf16 on a GPU that computes it natively, fp32 elsewhere
    (hycam_ds.eval.precision); bf16 on a CPU works, slowly."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N: where one process runs the model (auto: its GPU if there is
    one). Under ZeRO-3 DeepSpeed places every rank itself, and only auto is accepted."""
