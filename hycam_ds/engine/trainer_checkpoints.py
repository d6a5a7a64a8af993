"""How a training run saves and resumes: the checkpoint half of `Trainer`.

Saving: every rank writes and hashes its part into a staging directory, rank 0 merges the parts
into a manifest and publishes it atomically (checkpointing.publish); the ranks agree after each
stage, so a write that fails on one rank ends the job on all of them with the previous checkpoint
still `latest`. Resuming: which checkpoint, and whether this configuration may resume it, is
decided before any data is built or model loaded (find_checkpoint); the files are verified and
screened before DeepSpeed loads them, converted first when the world size changed (maybe_resume).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ..modeling.fileio import sha256_file
from ..modeling.injection import load_noise_state_dict, noise_state_dict
from . import checkpoint_shares as shares
from . import checkpointing as ckpt
from . import faults, resharding
from .distributed import ReportedElsewhere, all_reduce_max, gather_ints
from .ds_config import zero_stage
from .seeding import rank_noise_seed, seed_everything

log = logging.getLogger(__name__)

# config_changes() entries that only say where the data build is (a moved build is the same data)
_DATA_LOCATION = tuple(f"data.{name} " for name in ("dir", "recipe", "data_root", "seq_len", "vocab_size"))


class CheckpointSteps:
    """Mixed into Trainer; reads the run's state from the attributes Trainer.setup sets (cfg, rank,
    world, ds_config, engine, model, reader, data_dir, layout, step, ...)."""

    def find_checkpoint(self) -> None:
        """Which checkpoint this job resumes from, and whether this configuration can resume it: before
        any data is built or model loaded. Damaged files are found by maybe_resume's manifest check.
        Another world size is allowed: DeepSpeed then loads the checkpoint converted (resharding)."""
        checkpoint = ckpt.resolve_checkpoint(self.run_dir, self.cfg.checkpoint.resume)
        self.resume_from = checkpoint
        if checkpoint is None:
            return
        try:
            state = json.loads((checkpoint / ckpt.TRAINER_STATE).read_text())  # JSON: safe before the manifest check
        except (OSError, ValueError):
            return  # the manifest check says what is wrong with it
        if not isinstance(state, dict):
            return
        current, stage = self.cfg.to_dict(), zero_stage(self.ds_config)
        fixed, allowed = ckpt.run_changes(state, current, self.world, stage)
        if state.get("world_size", self.world) != self.world and stage > 0:
            self.ds_config = resharding.universal_load(self.ds_config)  # read when build_model creates the engine
        if isinstance(state.get("config"), dict):
            config_fixed, config_allowed = ckpt.config_changes(state["config"], current)
            if config_fixed and self._same_data(state):  # a data build moved (or named otherwise) is the same data
                moved = [c for c in config_fixed if c.startswith(_DATA_LOCATION)]
                config_fixed, config_allowed = [c for c in config_fixed if c not in moved], config_allowed + moved
            fixed, allowed = config_fixed + fixed, config_allowed + allowed
        if fixed:
            raise ckpt.CheckpointError(
                f"{checkpoint} was saved under another configuration: {'; '.join(fixed)}; resuming needs the "
                "same model, method and data: set these back, or start a new run (another run_dir, or "
                "checkpoint.overwrite=true)"
            )
        if allowed and self.rank == 0:
            log.warning("resuming %s with changed settings: %s", checkpoint.name, "; ".join(allowed))

    def _same_data(self, state: dict[str, Any]) -> bool:
        """Whether this job's data build is the checkpoint's: the same directory, or the same manifest."""
        new, old = self.planned_data_dir(), state.get("data_dir")
        if old is not None and new.resolve() == Path(old).resolve():
            return True
        if not (new / "manifest.json").is_file():
            return False
        saved = state.get("data_manifest_sha256")
        if saved is None and old is not None and (Path(old) / "manifest.json").is_file():
            saved = sha256_file(Path(old) / "manifest.json")
        return saved is not None and sha256_file(new / "manifest.json") == saved

    def maybe_resume(self) -> None:
        """Every rank verifies and screens the files it loads, once each (checkpoint_shares), rank 0
        lists the checkpoint for planted files; then DeepSpeed loads the screened objects, converted
        first when the world size changed (resharding); then the data position, noise and RNG."""
        checkpoint = self.resume_from
        if checkpoint is None:
            return
        converting = bool(self.ds_config.get("checkpoint", {}).get("load_universal"))
        loaded, error = {}, None
        try:
            manifest = ckpt.read_manifest(checkpoint)
            loaded = shares.verify_share(checkpoint, manifest, shares.share(manifest["files"], self.rank, converting))
            if self.rank == 0:
                ckpt.check_listing(checkpoint, manifest)
            try:
                state = json.loads(loaded[ckpt.TRAINER_STATE])
                resized = state["world_size"] != self.world
            except (KeyError, TypeError, ValueError):
                raise ckpt.CheckpointError(f"{checkpoint / ckpt.TRAINER_STATE}: missing or unreadable") from None
            if resized != converting and zero_stage(self.ds_config) > 0:
                raise ckpt.CheckpointError(f"{checkpoint / ckpt.TRAINER_STATE}: changed while this job started")
        except (ckpt.CheckpointError, OSError) as err:
            error = ckpt.with_way_out(self.run_dir, checkpoint, err)
        self._agree_resumed(error)
        if converting:
            self._load_converted(checkpoint)
        else:
            shares.load_engine(self.engine, checkpoint, shares.screened_objects(checkpoint, loaded))
        same_world = state["world_size"] == self.world
        self.reader.load_state_dict(state["reader"])  # a position in the global stream: any world size
        if self.is_hycam:
            noise = state["noise"]
            noise["seed"] = rank_noise_seed(self.hycam_config.seed, self.rank)
            noise["forward_count"] = resharding.noise_counter(state["noise_forward_counts"], self.rank, same_world)
            load_noise_state_dict(self.model, noise)
        rng = loaded.get(f"rng/rank_{self.rank:05d}.json")
        if rng is not None:
            ckpt.set_rng_state(json.loads(rng))
        else:  # a rank the saving job did not have
            seed_everything(resharding.new_rank_seed(self.cfg.optim.seed, self.rank, state["step"]))
        self.step = state["step"]
        self.skipped_steps = state.get("skipped_steps", 0)
        self.last_checkpoint = checkpoint
        if self.rank == 0:
            resized = "" if same_world else f", saved with {state['world_size']} ranks, resharded for {self.world}"
            log.info("resumed from step %d (%s%s)", self.step, checkpoint, resized)

    def _load_converted(self, checkpoint: Path) -> None:
        """Another world size: rank 0 converts DeepSpeed's files into a scratch directory, every rank
        screens what it will load from there, DeepSpeed loads it, rank 0 removes it."""
        scratch, error = resharding.scratch_dir(checkpoint), None
        if self.rank == 0:
            try:
                resharding.convert(checkpoint, scratch)
            except Exception as err:  # noqa: BLE001 - whatever DeepSpeed's converter raises, every rank must stop
                shutil.rmtree(scratch, ignore_errors=True)
                error = ckpt.CheckpointError(f"{checkpoint}: not convertible for {self.world} ranks ({err})")
        self._agree_resumed(error)
        try:
            screened = shares.screen_directory(scratch)
        except ckpt.CheckpointError as err:
            error = err
        self._agree_resumed(error)
        shares.load_engine(self.engine, scratch, screened)
        dist.barrier()
        if self.rank == 0:
            shutil.rmtree(scratch, ignore_errors=True)

    def _agree_resumed(self, error: Exception | None) -> None:
        """Collective: if any rank refused its share of the checkpoint, every rank stops here (the
        refusing ones with their own message)."""
        if all_reduce_max(int(error is not None)):
            if error is None:
                raise ReportedElsewhere("the checkpoint was refused on another rank")
            raise error

    def save_checkpoint(self) -> None:
        """Every rank writes its part into the staging directory and hashes the files it wrote
        (checkpoint_shares); rank 0 merges the parts into the manifest and publishes. A write that
        fails (a full disk, lost permissions) ends the job with the previous checkpoint still latest:
        the ranks agree after each stage, so none waits for one that gave up."""
        stage = ckpt.staging_dir(self.ckpt_root, self.step)
        self._agree_saved(self._attempt(lambda: self._fresh_stage(stage)) if self.rank == 0 else None)
        try:
            part = shares.save_engine(self.engine, stage, fsync=self.cfg.checkpoint.durable)
            self._save_point("engine")
        except OSError as err:
            # Inside DeepSpeed's save the peers may wait in its own barrier: this rank ends the job.
            raise self._save_error(err) from None
        counts = gather_ints(noise_state_dict(self.model)["forward_count"] if self.is_hycam else 0)
        state = None
        if self.rank == 0:
            state = {
                "step": self.step,
                "world_size": self.world,
                "zero_stage": zero_stage(self.ds_config),
                "reader": self.reader.state_dict(),
                "noise": noise_state_dict(self.model) if self.is_hycam else None,
                "noise_forward_counts": counts,
                "skipped_steps": self.skipped_steps,
                "config": self.cfg.to_dict(),
                "data_dir": str(self.data_dir.absolute()),
                "data_manifest_sha256": sha256_file(self.data_dir / "manifest.json"),
            }

        def rank_files():
            part.update(ckpt.write_rank_files(stage, self.rank, state))
            self._save_point("rank_files")

        self._agree_saved(self._attempt(rank_files))
        merged = shares.gather_parts(part)
        published: list[Path] = []
        error = None
        if self.rank == 0:
            error = self._attempt(
                lambda: published.append(
                    ckpt.publish(
                        self.ckpt_root,
                        self.step,
                        self.cfg.checkpoint.keep_last,
                        self._save_point,
                        files=merged,
                        durable=self.cfg.checkpoint.durable,
                    )
                )
            )
        self._agree_saved(error)
        self.last_checkpoint = self.ckpt_root / ckpt.checkpoint_name(self.step)
        if self.rank == 0:
            log.info("checkpoint %s", published[0])

    @staticmethod
    def _fresh_stage(stage: Path) -> None:
        """An empty staging directory: what a killed attempt at the same step left is not this save's."""
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)

    def _save_point(self, point: str) -> None:
        """Fault injection between the stages of a save (HYCAM_FAULT: kill_save, disk_full)."""
        faults.at_save_point(self.rank, self.step, point, str(ckpt.staging_dir(self.ckpt_root, self.step)))

    @staticmethod
    def _attempt(action) -> OSError | None:
        try:
            action()
        except OSError as err:
            return err
        return None

    def _agree_saved(self, error: OSError | None) -> None:
        """Collective: if any rank failed its part of the save, every rank stops here."""
        if all_reduce_max(int(error is not None)):
            if error is None:
                raise ReportedElsewhere(f"checkpoint of step {self.step} failed on another rank")
            raise self._save_error(error)

    def _save_error(self, error: OSError) -> ckpt.CheckpointError:
        if self.rank == 0:
            shutil.rmtree(ckpt.staging_dir(self.ckpt_root, self.step), ignore_errors=True)
        pointer = self.ckpt_root / ckpt.POINTER
        latest = pointer.read_text().strip() if pointer.is_file() else None
        cause = f"{error.filename}: {error.strerror}" if error.filename and error.strerror else str(error)
        still = f"the latest checkpoint is still {self.ckpt_root / latest}" if latest else "there is no checkpoint yet"
        return ckpt.CheckpointError(
            f"checkpoint of step {self.step} not written ({cause}); {still}: free space (or fix the permissions), "
            "then resume with checkpoint.resume=auto"
        )

    def _archive_abandoned_checkpoints(self) -> None:
        """Resuming from an explicit, older checkpoint abandons the checkpoints after it: they move
        to archive/ with the metrics they belong to, rather than being mixed with the new ones."""
        newer = [p for p in ckpt.complete_checkpoints(self.ckpt_root) if p.name > self.resume_from.name]
        if not newer:
            return
        destination = self.layout.archive / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}-after-{self.resume_from.name}"
        (destination / "checkpoints").mkdir(parents=True)
        for path in newer:
            os.replace(path, destination / "checkpoints" / path.name)
        if self.layout.metrics.is_file():
            shutil.copy2(self.layout.metrics, destination / "metrics.jsonl")
        log.warning(
            "resuming from %s: the later checkpoints (%s) and the metrics up to them moved to %s",
            self.resume_from.name,
            ", ".join(p.name for p in newer),
            destination,
        )
