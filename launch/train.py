"""Train HyCAM (or a baseline) on a frozen backbone with DeepSpeed.

    deepspeed --num_gpus N launch/train.py --ds_config ds_configs/zero3.json \
        --config launch/configs/X.yaml [key=value ...]
    python launch/train.py                      # one process: the embedded default, a few minutes on 2 CPU cores

The YAML mirrors hycam_ds.engine.train_config.TrainConfig; key=value overrides any field
(optim.max_steps=20, method=lora, checkpoint.resume=auto). Invalid settings are rejected
before any model or data is loaded. Exit status: 0 completed / stopped / preempted (requeued),
2 invalid configuration, 3 diverged (optim.max_bad_steps non-finite steps in a row), 1 any other failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from hycam_ds.engine.train_config import ConfigError, load_train_config


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="experiment YAML (default: the embedded default)")
    parser.add_argument("--ds_config", default="ds_configs/zero3.json", help="DeepSpeed JSON config")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the YAML")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
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
        print(f"train.py: invalid configuration: {err}", file=sys.stderr)
        return 2
    from data_pipeline.pretrained import PretrainedRefError
    from hycam_ds.engine.trainer import Trainer

    trainer = Trainer(cfg, ds_raw)
    try:
        trainer.setup()
    except ConfigError as err:  # checks that need the world size (batch sizes vs DeepSpeed JSON)
        print(f"train.py: invalid configuration: {err}", file=sys.stderr)
        return 2
    except PretrainedRefError as err:  # a backbone that is not where model.path says (offline cache, hub id, files)
        print(f"train.py: model.path: {err}", file=sys.stderr)
        return 2
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
    if outcome == "completed" and cfg.checkpoint.export_adapter:
        trainer.export()
    if outcome == "completed":
        trainer.evaluate()
    logging.getLogger("train").info("%s at step %d; run directory %s", outcome, trainer.step, cfg.run_dir)
    trainer.close(success=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
