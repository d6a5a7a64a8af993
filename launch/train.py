"""Train HyCAM (or a baseline) on a frozen backbone with DeepSpeed.

    deepspeed --num_gpus N launch/train.py --ds_config ds_configs/zero3.json \
        --config launch/configs/X.yaml [key=value ...]
    python launch/train.py                      # one process: the embedded default, a few minutes on 2 CPU cores

The YAML mirrors hycam_ds.engine.train_config.TrainConfig; key=value overrides any field
(optim.max_steps=20, method=lora, checkpoint.resume=auto). Invalid settings are rejected
before any model or data is loaded. One run per run directory: a second job on it is refused,
and a directory that holds a run is used only to continue it (checkpoint.resume=auto) or to
start it over (checkpoint.overwrite=true, the old files move to RUN/archive/).

Exit status:
    0    completed; or stopped with a checkpoint: optim.stop_at_step, SIGTERM (scancel), SIGUSR1
         (a SLURM preemption warning: requeued)
    1    a failure that is a bug (with its traceback)
    2    a rejected command, one line on stderr: invalid configuration, a run directory in use, holding
         another run, not writable or a file, a damaged checkpoint or one saved under another
         configuration, a full disk or lost permissions (a checkpoint that could not be written leaves
         the previous one as latest)
    3    diverged: optim.max_bad_steps non-finite steps in a row (the last good weights are saved)
    4    interrupted by Ctrl-C, checkpoint saved: the line printed says where, and the command that resumes
    130  a second Ctrl-C (aborted at once, without a checkpoint), or Ctrl-C before training started
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import warnings

from hycam_ds.engine.cli import run_main
from hycam_ds.engine.train_config import ConfigError, load_train_config

PROG = "train.py"
INTERRUPTED = 4
"""Exit status of a run stopped by Ctrl-C after saving a checkpoint."""
ABORTED = 130
"""Exit status of a run stopped by Ctrl-C with nothing saved (128 + SIGINT, as shells report it)."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="experiment YAML (default: the embedded default)")
    parser.add_argument("--ds_config", default="ds_configs/zero3.json", help="DeepSpeed JSON config")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the YAML")
    return parser.parse_args(argv)


# Set by a launcher (deepspeed, torchrun, srun), read before a single process sets its own.
LAUNCHED = any(name in os.environ for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"))


def resume_command(argv: list[str]) -> str:
    """The command that continues this run: the same arguments with checkpoint.resume=auto (under a
    launcher, what to give it; without one, the whole python command)."""
    kept = [a for a in argv if not a.startswith(("checkpoint.resume=", "checkpoint.overwrite=", "--local_rank"))]
    script = os.path.relpath(os.path.abspath(sys.argv[0]))
    args = shlex.join([script, *kept, "checkpoint.resume=auto"])
    return f"the same launcher with {args}" if LAUNCHED else f"python {args}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run_main(PROG, lambda: train(argv))
    except KeyboardInterrupt:  # while the configuration loads or the libraries import: nothing started yet
        _say(os.environ.get("RANK", "0"), "interrupted by Ctrl-C before training started: no checkpoint written")
        return ABORTED


def train(argv: list[str]) -> int:
    args = parse_args(argv)
    rank = os.environ.get("RANK", "0")
    # DeepSpeed 0.19 calls a torch.distributed function that torch 2.13 deprecates, every step.
    warnings.filterwarnings(
        "ignore", message=".*(reduce_scatter_tensor|all_gather_into_tensor).*", category=FutureWarning
    )
    logging.basicConfig(
        level=logging.INFO if rank == "0" else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    try:
        from hycam_ds.engine.ds_config import load_ds_config

        cfg = load_train_config(args.config, args.overrides)
        ds_raw = load_ds_config(args.ds_config)
    except ConfigError as err:
        print(f"{PROG}: invalid configuration: {err}", file=sys.stderr)
        return 2
    from hycam_ds.engine.cli import USER_ERRORS
    from hycam_ds.engine.distributed import ReportedElsewhere, process_group_left_on_exit
    from hycam_ds.engine.trainer import Trainer

    trainer = Trainer(cfg, ds_raw)
    with process_group_left_on_exit(agreed=(ReportedElsewhere, *USER_ERRORS)):
        return _train(trainer, cfg, argv, rank)


def _train(trainer, cfg, argv: list[str], rank: str) -> int:
    """Set up and run; each status returned here is one every rank reaches (or was told of)."""
    from data_pipeline.pretrained import PretrainedRefError
    from hycam_ds.engine.distributed import ReportedElsewhere

    try:
        try:
            trainer.setup()
        except ConfigError as err:  # checks that need the world size (batch sizes vs DeepSpeed JSON)
            print(f"{PROG}: invalid configuration: {err}", file=sys.stderr)
            return 2
        except PretrainedRefError as err:  # a backbone that is not where model.path says (offline cache, hub id, files)
            print(f"{PROG}: model.path: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            _say(rank, "interrupted by Ctrl-C before training started: no checkpoint written")
            return ABORTED
        return run(trainer, cfg, argv, rank)
    except ReportedElsewhere:  # rank 0 (or the rank that failed) printed the one line
        return 2
    finally:
        trainer.release_run_dir()


def run(trainer, cfg, argv: list[str], rank: str) -> int:
    """Train, then export and evaluate; the exit status says how it ended."""
    outcome = trainer.fit()
    if outcome == "diverged":
        logging.getLogger("train").error(
            "stopped at step %d after %d consecutive non-finite steps; the last good "
            "weights are in the latest checkpoint",
            trainer.step,
            cfg.optim.max_bad_steps,
        )
        trainer.close(success=True)
        return 3
    if outcome == "interrupted":
        # The checkpoint is saved and the job ends now: the SIGTERM a launcher sends after a Ctrl-C
        # (which Python's own shutdown would no longer catch) must not turn exit 4 into a kill.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _say(rank, interrupted_message(trainer, cfg, argv, "at"))
        trainer.close(success=True)
        return INTERRUPTED
    try:
        if outcome == "completed" and cfg.checkpoint.export_adapter:
            trainer.export()
        if outcome == "completed":
            trainer.evaluate()
    except KeyboardInterrupt:  # after the last checkpoint: only the export or the final evaluation is lost
        _say(rank, interrupted_message(trainer, cfg, argv, "after the export or final evaluation began, at"))
        return INTERRUPTED
    logging.getLogger("train").info("%s at step %d; run directory %s", outcome, trainer.step, cfg.run_dir)
    trainer.close(success=True)
    return 0


def interrupted_message(trainer, cfg, argv: list[str], when: str) -> str:
    return (
        f"interrupted by Ctrl-C {when} step {trainer.step} of {cfg.optim.max_steps}; checkpoint saved in "
        f"{trainer.last_checkpoint}; to resume, run {resume_command(argv)}"
    )


def _say(rank: str, text: str) -> None:
    if rank == "0":
        print(f"{PROG}: {text}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
