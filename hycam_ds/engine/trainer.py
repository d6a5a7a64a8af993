"""The training recipe: setup -> fit -> evaluate -> save_checkpoint -> export.

Runs one process per rank (the deepspeed launcher, srun, torchrun, or plain python for one
rank). The backbone is loaded already partitioned under ZeRO-3, frozen; only the method's
parameters train. Loss = LM loss over the response tokens of the whole optimizer step (all
micro-batches and ranks, weighted by token count) + balance_weight * the router's balance loss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from ..modeling.fileio import replace_directory, write_json_atomic
from ..modeling.injection import (
    has_hycam,
    has_router,
    set_noise_seed,
    set_record_stats,
)
from ..modeling.losses import balance_loss
from ..modeling.stats import routing_stats
from . import faults
from . import telemetry as tags
from .distributed import ReportedElsewhere, all_reduce_sum, gather_ints, init_process_group, leave_process_group
from .ds_config import resolve_ds_config, zero_stage
from .lm_loss import add_task_sums, packed_token_losses, perplexity, task_losses
from .methods import BackboneLoader, adapt, count_parameters
from .run_dir import Claim, RunDir, RunInfo, claim_run_dir
from .seeding import rank_noise_seed, seed_everything
from .telemetry import CollapseDetector, Telemetry, routing_scalars
from .train_config import TrainConfig, effective_hycam_config
from .trainer_checkpoints import CheckpointSteps

log = logging.getLogger(__name__)


def tokenizer_reference(ref: str) -> str:
    """How run_info.json names the tokenizer: an absolute path, a .gguf file or a hub id left as written."""
    from data_pipeline import parse_pretrained

    return str(parse_pretrained(ref))


def data_cache_key(cfg: TrainConfig) -> str:
    recipe = Path(cfg.data.recipe)
    described = {
        "recipe": recipe.read_text(),
        "seq_len": cfg.data.seq_len,
        "vocab_size": cfg.data.vocab_size,
        "tokenizer": cfg.model.path,
        "data_root": cfg.data.data_root,
    }
    if cfg.data.template is not None:  # unset, the recipe's own template builds, and the recipe text is hashed
        described["template"] = cfg.data.template
    return f"{recipe.stem}-{hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:12]}"


@dataclass
class StepResult:
    lm_loss: float
    balance_loss: float
    tokens: int
    input_tokens: int
    task_loss: dict[str, float] = field(default_factory=dict)
    finite: bool = True
    batch_fingerprint: int = 0
    weights_checksum: float | None = None
    """The sum of every trainable value after the step, over all ranks (logging.weights_checksum)."""


class Trainer(CheckpointSteps):
    def __init__(self, cfg: TrainConfig, ds_raw: dict[str, Any]):
        self.cfg = cfg
        self.ds_raw = ds_raw
        self.run_dir = Path(cfg.run_dir)
        self.layout = RunDir(self.run_dir)
        self.ckpt_root = self.layout.checkpoints
        self.step = 0
        self.skipped_steps = 0
        self.claim: Claim | None = None  # rank 0's hold on the run directory (its lock)
        self.resume_from: Path | None = None
        self.last_checkpoint: Path | None = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Checks first, writes last: nothing in the run directory changes until the run directory,
        the checkpoint to resume from and the configuration have all been accepted."""
        self.rank, self.world = init_process_group()
        seed_everything(self.cfg.optim.seed + self.rank)
        self.bf16 = self._resolve_bf16()
        self.ds_config = resolve_ds_config(self.ds_raw, self.cfg, self.world, self.bf16)
        self.claim = self._decided_by_rank0(self._claim_run_dir)
        self.find_checkpoint()
        self.build_data()
        self.build_model()
        self.maybe_resume()
        if self.rank == 0:
            self.write_run_files()
        # A resumed run rewrites history from its checkpoint on: metrics of steps after it (a run
        # killed past its last checkpoint) are dropped, TensorBoard purges them (purge_step).
        self.telemetry = Telemetry(
            self.run_dir,
            self.rank == 0,
            self.cfg.logging.tensorboard,
            CollapseDetector(self.cfg.logging.collapse_threshold, self.cfg.logging.collapse_patience),
            resume_step=self.step if self.step > 0 else None,
        )

    def _claim_run_dir(self) -> Claim:
        """Rank 0: the run directory's lock and verdict, and (when the run keeps its files) whether
        the adapter export at the end may replace what RUN/adapter holds: refused now, not after training."""
        from .exporting import check_export_destination

        claim = claim_run_dir(self.layout, self.cfg.checkpoint.resume, self.cfg.checkpoint.overwrite)
        try:
            if self.cfg.checkpoint.export_adapter and claim.archive_reason is None:
                check_export_destination(self.layout.adapter)
        except BaseException:
            claim.release()
            raise
        return claim

    def _decided_by_rank0(self, action):
        """Run `action` on rank 0 only and let every rank know how it went (no rank waits for a
        decision that never comes): rank 0 raises its error, the others ReportedElsewhere."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = action()
            except Exception as err:  # noqa: BLE001 - whatever it is, the other ranks must hear of it
                error = err
        if self.world > 1:
            verdict = [None if error is None else str(error) or type(error).__name__]
            dist.broadcast_object_list(verdict, src=0)
            if self.rank != 0 and verdict[0] is not None:
                raise ReportedElsewhere(verdict[0])
        if error is not None:
            raise error
        return result

    def _resolve_bf16(self) -> bool:
        precision = self.cfg.optim.precision
        if precision == "auto":
            return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return precision == "bf16"

    def planned_data_dir(self) -> Path:
        """The data build this job reads (data.dir, or where the recipe is built), known before building."""
        if self.cfg.data.dir is not None:
            return Path(self.cfg.data.dir)
        return Path(self.cfg.data.cache_dir) / data_cache_key(self.cfg)

    def build_data(self) -> None:
        from data_pipeline import (
            BuildConfig,
            ShardReader,
            build_dataset,
            load_tokenizer,
            manifest_template,
            tokenizer_fingerprint,
        )

        data_dir = self.planned_data_dir()
        if self.cfg.data.dir is None:
            if self.rank == 0 and not (data_dir / "manifest.json").is_file():
                log.info("building %s into %s", self.cfg.data.recipe, data_dir)
                build_dataset(
                    BuildConfig(
                        recipe=self.cfg.data.recipe,
                        out=str(data_dir),
                        data_root=self.cfg.data.data_root,
                        tokenizer=self.cfg.model.path,
                        train_tokenizer=self.cfg.model.path is None,
                        vocab_size=self.cfg.data.vocab_size,
                        seq_len=self.cfg.data.seq_len,
                        template=self.cfg.data.template,
                    )
                )
            dist.barrier()
        self.data_dir = data_dir
        tokenizer_path = self.cfg.model.path or str(self.data_dir / "tokenizer")
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.tokenizer_ref = tokenizer_reference(tokenizer_path)
        fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.reader = ShardReader(
            self.data_dir,
            "train",
            self.rank,
            self.world,
            self.cfg.optim.micro_batch_size,
            seed=self.cfg.data.seed,
            tokenizer_fingerprint=fingerprint,
            task_sampling=self.cfg.data.task_sampling,
            temperature=self.cfg.data.temperature,
            template=self.cfg.data.template,
        )
        self.fingerprint = fingerprint
        self.tasks = self.reader.tasks
        self.template = manifest_template(self.reader.manifest)

    def build_model(self) -> None:
        import deepspeed

        dtype = torch.bfloat16 if self.bf16 else torch.float32
        self.hycam_config = effective_hycam_config(self.cfg)
        loader = BackboneLoader(self.ds_config)
        backbone = loader.load(self.cfg, len(self.tokenizer), dtype)
        model, params = adapt(backbone, self.cfg)
        self.trainable, self.total = count_parameters(model)
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=self.ds_config)
        self._loader = loader  # keep the HfDeepSpeedConfig alive as long as the model
        self.model = self.engine.module
        self.is_hycam = has_hycam(self.model)
        self.routes = has_router(self.model)
        if self.is_hycam:
            set_noise_seed(self.model, rank_noise_seed(self.hycam_config.seed, self.rank))
        local_bytes = sum(
            int(getattr(p, "ds_tensor", p).numel()) * p.element_size()
            for p in self.model.parameters()
            if not p.requires_grad
        )
        # What ZeRO-3 left on each rank of the frozen backbone: about total / world.
        self.frozen_bytes_per_rank = gather_ints(local_bytes)

    def write_run_files(self) -> None:
        """Rank 0, once every check has passed: the first writes into the run directory. What the
        claim decided to archive moves first; then the config, the run's own tokenizer and what
        launch/evaluate.py --run-dir needs to rebuild this run's model and data (run_info.json)."""
        log.info(
            "method=%s: %s trainable of %s parameters (%.3f%%), ZeRO stage %d, %s, world %d",
            self.cfg.method,
            f"{self.trainable:,}",
            f"{self.total:,}",
            100 * self.trainable / self.total,
            zero_stage(self.ds_config),
            "bf16" if self.bf16 else "fp32",
            self.world,
        )
        self.claim.commit()
        if self.resume_from is not None and self.cfg.checkpoint.resume != "auto":
            self._archive_abandoned_checkpoints()
        write_json_atomic(self.layout.config, self.cfg.to_dict())
        write_json_atomic(self.layout.ds_config, self.ds_config)
        self.layout.update_partition(
            world_size=self.world,
            frozen_bytes_per_rank=self.frozen_bytes_per_rank,
            zero_stage=zero_stage(self.ds_config),
        )
        model = self.cfg.to_dict()["model"]
        if model["path"] is not None and Path(model["path"]).expanduser().exists():
            model["path"] = str(Path(model["path"]).expanduser().absolute())  # readable from any directory
        self.layout.write_info(
            RunInfo(
                data_dir=self.layout.relative(self.data_dir),
                tokenizer=self.tokenizer_ref,
                tokenizer_dir=self.save_tokenizer(),
                adapter=self.layout.relative(self.layout.adapter),
                method=self.cfg.method,
                model=model,
                template=self.template,
                trainable_parameters=self.trainable,
                total_parameters=self.total,
            )
        )

    def save_tokenizer(self) -> str | None:
        """RUN/tokenizer, the run's own copy of its tokenizer (a run directory moved elsewhere, or
        whose data build was removed, still evaluates); its path relative to the run directory, or
        None when the copy does not read back as the same tokenizer (then the reference is used)."""
        from data_pipeline import load_tokenizer, tokenizer_fingerprint

        target = self.layout.tokenizer
        if not target.is_dir():
            stage = Path(tempfile.mkdtemp(prefix=".tokenizer.tmp-", dir=self.run_dir))
            stage.chmod(0o755)  # mkdtemp's 0700 would hide it from the other users of a shared run directory
            try:
                self.tokenizer.save_pretrained(str(stage))
                replace_directory(stage, target)
            finally:
                shutil.rmtree(stage, ignore_errors=True)
        try:
            same = tokenizer_fingerprint(load_tokenizer(str(target.absolute()))) == self.fingerprint
        except Exception as err:  # noqa: BLE001 - a copy that does not load is not used, whatever the reason
            log.warning("%s: the tokenizer's copy does not load (%s); run_info.json names the original", target, err)
            return None
        if not same:
            log.warning("%s: the tokenizer's copy differs from the original; run_info.json names the original", target)
            return None
        return self.layout.relative(target)

    # ------------------------------------------------------------------ one step
    def forward_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token LM losses [B, L-1] (0 where no loss) and the bool mask of loss tokens."""
        return packed_token_losses(self.engine, batch, self.engine.device)

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
        """One optimizer step. Two collectives: the step's token counts before the first backward
        (the gradient is normalised by them), then every scalar the step reports, in one tensor.
        The host waits for the device once, at the end, to read them."""
        world, accum, device = self.world, len(micro_batches), self.engine.device
        local_counts = [
            sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro_batches),
            sum(int((mb["segment_ids"] > 0).sum()) for mb in micro_batches),
        ]
        counts = all_reduce_sum(torch.tensor(local_counts, dtype=torch.float64, device=device))
        # DeepSpeed divides by accum (backward) and averages over ranks: scaling by
        # world * accum / global_tokens makes the gradient sum(token losses) / global_tokens.
        scale = (world * accum / counts[0].clamp_min(1.0)).float()
        task_sums = torch.zeros(len(self.tasks), 2, dtype=torch.float64, device=device)
        lm_sum = torch.zeros((), dtype=torch.float64, device=device)
        balance_sum = torch.zeros((), dtype=torch.float64, device=device)
        weight = self.hycam_config.balance_weight if self.routes else 0.0
        fingerprint = sum(
            int(hashlib.sha256(mb["input_ids"].numpy().tobytes()).hexdigest()[:8], 16) for mb in micro_batches
        )
        hook = None
        if faults.active("nan_grad", self.rank, self.step + 1):
            first = next(p for p in self.engine.module.parameters() if p.requires_grad)
            hook = first.register_hook(lambda grad: grad + float("inf"))
        for mb in micro_batches:
            losses, mask = self.forward_losses(mb)
            token_sum = losses.sum()
            if faults.active("nan_loss", self.rank, self.step + 1):
                token_sum = token_sum * float("nan")
            loss = token_sum * scale
            if weight > 0:
                bal = balance_loss(self.model, segment_ids=mb["segment_ids"].to(losses.device))
                loss = loss + weight * bal
                balance_sum += bal.detach()
            self.engine.backward(loss)
            self.engine.step()  # ZeRO skips the update when the global gradient norm is not finite
            lm_sum += token_sum.detach()
            add_task_sums(task_sums, losses, mask, mb["task_ids"])
        if hook is not None:
            hook.remove()
        scalars = [lm_sum, balance_sum / accum, torch.tensor(fingerprint % 2**24, dtype=torch.float64, device=device)]
        if self.cfg.logging.weights_checksum:
            scalars.append(self._weights_checksum())
        totals = all_reduce_sum(torch.cat([torch.stack(scalars), task_sums.flatten()]))
        global_tokens, global_inputs, *totals = torch.cat([counts, totals]).tolist()
        task_totals = totals[len(scalars) :]
        task_loss = {t: total / n for t, total, n in zip(self.tasks, task_totals[0::2], task_totals[1::2]) if n > 0}
        lm = totals[0] / max(global_tokens, 1.0)
        return StepResult(
            lm_loss=lm,
            balance_loss=totals[1] / world,
            tokens=int(global_tokens),
            input_tokens=int(global_inputs),
            task_loss=task_loss,
            # What the engine did: DeepSpeed's ZeRO skips an update whose gradient norm is not finite
            # (the same verdict on every rank) and says so; a non-finite loss counts as bad too.
            finite=self.engine.was_step_applied() and math.isfinite(lm),
            batch_fingerprint=int(totals[2]),
            weights_checksum=totals[3] if self.cfg.logging.weights_checksum else None,
        )

    def _weights_checksum(self) -> torch.Tensor:
        """This rank's sum of the trainable values it holds (its ZeRO partitions), on the device,
        without a wait per parameter: summed over ranks, a skipped step leaves it unchanged."""
        device = self.engine.device
        sums = [
            getattr(p, "ds_tensor", p).detach().double().sum().to(device)
            for p in self.engine.module.parameters()
            if p.requires_grad
        ]
        return torch.stack(sums).sum() if sums else torch.zeros((), dtype=torch.float64, device=device)

    # ------------------------------------------------------------------ fit
    def fit(self) -> str:
        """Train to optim.max_steps (or stop_at_step / a preemption). Returns how it ended."""
        from data_pipeline.progress import progress

        from .preemption import PreemptionGuard

        cfg = self.cfg
        guard = PreemptionGuard()
        batches: Iterator = iter(self.reader)
        stop_at = cfg.optim.stop_at_step or cfg.optim.max_steps
        bar = progress(
            total=cfg.optim.max_steps,
            initial=self.step,
            desc=f"train {cfg.method}",
            unit="step",
            disable=self.rank != 0 or not cfg.logging.progress,
        )
        outcome = "completed"
        bad_streak = 0
        try:
            while self.step < stop_at:
                faults.at_step_start(self.rank, self.step + 1)
                started = time.perf_counter()
                record = self.step % cfg.logging.log_every == 0 or self.step + 1 == stop_at
                if self.is_hycam:
                    set_record_stats(self.model, record)
                result = self.train_step([next(batches) for _ in range(cfg.optim.grad_accum)])
                self.step += 1
                elapsed = time.perf_counter() - started
                bad_streak = 0 if result.finite else bad_streak + 1
                if not result.finite:
                    self.skipped_steps += 1
                    log.warning(
                        "rank %d: step %d skipped: non-finite loss or gradient (weights unchanged; %d in a row)",
                        self.rank,
                        self.step,
                        bad_streak,
                    )
                if record or not result.finite:
                    self.log_step(result, elapsed)
                if bad_streak >= cfg.optim.max_bad_steps:
                    outcome = "diverged"
                    break
                bar.update(1)
                bar.set_postfix(loss=f"{result.lm_loss:.4f}")
                if (
                    cfg.logging.eval_every
                    and self.step % cfg.logging.eval_every == 0
                    and self.step < cfg.optim.max_steps
                ):
                    self.evaluate()
                if guard.should_stop():
                    outcome = self._stop_outcome(guard)
                    break
                if cfg.checkpoint.save_every and self.step % cfg.checkpoint.save_every == 0 and self.step < stop_at:
                    self.save_checkpoint()
            # Skipped steps leave the weights untouched: after a run of bad steps this checkpoint
            # holds the last good weights (and the data position past the bad batches).
            self.save_checkpoint()
            if outcome in ("preempted", "stopped") and guard.preempted:
                guard.requeue()
            elif outcome == "completed" and guard.should_stop() and guard.interrupted:
                outcome = "interrupted"  # Ctrl-C during the last save: the export and evaluation are skipped
            elif outcome == "completed" and self.step < cfg.optim.max_steps:
                outcome = "stopped"
        except BaseException:
            guard.close()
            raise
        finally:
            bar.close()
        if outcome == "completed":
            guard.close()  # the export and evaluation follow: a Ctrl-C there is a KeyboardInterrupt (launch/train.py)
        else:
            # The job is ending: a SIGTERM (the deepspeed launcher sends one after a Ctrl-C) or a second
            # Ctrl-C while it closes down is the guard's to handle, not a kill halfway through.
            self._guard = guard
        return outcome

    @staticmethod
    def _stop_outcome(guard) -> str:
        if guard.interrupted:
            return "interrupted"  # Ctrl-C (SIGINT) on some rank: exit status 4
        return "preempted" if guard.requeue_requested else "stopped"  # SIGTERM: cancelled, not requeued

    def log_step(self, result: StepResult, elapsed: float) -> None:
        scalars = {
            tags.TRAIN_LOSS: result.lm_loss + self.hycam_config.balance_weight * result.balance_loss * self.routes,
            tags.LM_LOSS: result.lm_loss,
            tags.BALANCE_LOSS: result.balance_loss,
            tags.LR: float(self.engine.get_lr()[0]),
            tags.TOKENS_PER_S: result.input_tokens / max(elapsed, 1e-9),
            tags.LOSS_TOKENS: result.tokens,
            tags.SKIPPED_STEPS: self.skipped_steps,
            tags.STEP_SKIPPED: float(not result.finite),
            tags.BATCH_FINGERPRINT: result.batch_fingerprint,
        }
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            scalars[tags.GRAD_NORM] = float(grad_norm)
        if result.weights_checksum is not None:
            scalars[tags.WEIGHTS_CHECKSUM] = result.weights_checksum
        scalars.update({tags.task_train_loss(t): v for t, v in result.task_loss.items()})
        if self.routes:
            stats = routing_stats(self.model)
            scalars.update(routing_scalars(stats))
            self.telemetry.observe_routing(self.step, stats)
        self.telemetry.log(self.step, scalars)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        """Per-task held-out loss and perplexity on the eval split (all ranks take part)."""
        from data_pipeline import ShardReader
        from data_pipeline.progress import progress

        reader = ShardReader(
            self.data_dir,
            "eval",
            self.rank,
            self.world,
            self.cfg.optim.micro_batch_size,
            tokenizer_fingerprint=self.fingerprint,
            drop_last=False,
            template=self.cfg.data.template,
        )
        batches = list(reader)
        if self.cfg.logging.eval_batches is not None:
            batches = batches[: self.cfg.logging.eval_batches]
        shown = partial(progress, disable=self.rank != 0 or not self.cfg.logging.progress)
        self.engine.eval()
        sums, routing = task_losses(
            self.engine,
            self.model,
            batches,
            len(self.tasks),
            self.cfg.optim.micro_batch_size,
            reader.seq_len,
            self.engine.device,
            shown,
        )
        self.engine.train()
        metrics: dict[str, float] = {}
        for i, task in enumerate(self.tasks):
            if sums[i, 1] > 0:
                metrics[tags.task_eval_loss(task)] = float(sums[i, 0] / sums[i, 1])
                metrics[tags.task_eval_ppl(task)] = perplexity(float(sums[i, 0]), float(sums[i, 1]))
        total = sums.sum(0)
        metrics[tags.EVAL_LOSS] = float(total[0] / max(total[1], 1))
        metrics[tags.EVAL_PPL] = perplexity(float(total[0]), float(total[1]))
        metrics[tags.EVAL_TOKENS] = float(total[1])
        self.telemetry.log(self.step, metrics, kind="eval")
        if routing is not None:
            self.telemetry.routing_heatmap(self.step, routing.by_layer(), self.tasks)
        if self.rank == 0:
            log.info(
                "eval step %d: loss %.4f ppl %.2f | %s",
                self.step,
                metrics[tags.EVAL_LOSS],
                metrics[tags.EVAL_PPL],
                " ".join(f"{t}={metrics.get(tags.task_eval_ppl(t), float('nan')):.2f}" for t in self.tasks),
            )
        return metrics

    # ------------------------------------------------------------------ export and exit
    def export(self) -> Path | None:
        """Write run_dir/adapter: HyCAM tensors gathered from ZeRO-3 partitions on every rank
        (a collective), saved by rank 0 with save_adapter; LoRA via PEFT; full: the model."""
        from .exporting import export_trained

        return export_trained(
            self.model,
            self.cfg.method,
            self.layout.adapter,
            stage3=zero_stage(self.ds_config) == 3,
            is_writer=self.rank == 0,
            tokenizer=self.tokenizer,
        )

    def record_peak_memory(self) -> None:
        """Peak resident memory of every rank (and peak CUDA memory on GPUs) into partition.json."""
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        rss, gpu = gather_ints(peak), gather_ints(cuda)
        if self.rank == 0:
            self.layout.update_partition(peak_rss_bytes_per_rank=rss, peak_cuda_bytes_per_rank=gpu)

    def release_run_dir(self) -> None:
        """Give the run directory back (rank 0's lock; removed, so nothing of it is left)."""
        if self.claim is not None:
            self.claim.release()
            self.claim = None

    def close(self, success: bool) -> None:
        self.telemetry.close()
        if success and dist.is_initialized():
            self.record_peak_memory()
            # Only here, where every rank arrives, may the teardown wait for the others; the
            # other exits leave the group without waiting (launch/train.py).
            dist.barrier()
            self.engine.destroy()
            leave_process_group()
