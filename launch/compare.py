"""The paper's comparison: the untouched backbone, full fine-tuning, LoRA, the shared CAM alone, HyCAM
and HyCAM without the balance loss, on the same backbone, data, token budget and schedule shape;
each trained with launch/train.py and evaluated with launch/evaluate.py on the test split.

    python launch/compare.py --backbone runs/backbones/smollm2-135m-instruct --data-root ../shared/data \
        --template chat --out runs/compare-smollm2 --steps 100 --sweep-steps 30
    python launch/compare.py --backbone-name tiny-llama --recipe data_pipeline/recipes/embedded.yaml \
        --steps 4 --out /tmp/c   # smoke test

Learning rates. With `--sweep-steps S`, every trained method runs each of its candidate learning
rates (`--lrs` or the defaults below) with the whole run's schedule but stops at step S and is
scored by its loss on the eval split (never the test split); the best run is then continued from
its step-S checkpoint to `--steps`, so the sweep's compute is part of the winner's run. An
ablation (HyCAM without the balance loss) takes the learning rate chosen for the method it
ablates, so that the two differ only in what is ablated. Without a sweep each method trains at
its first candidate.

Resumable: every stage writes its result beside its run directory (sweep scores, timing.json,
the evaluation report) and is skipped when run again; training runs save checkpoints every
`--save-every` steps and resume from them (checkpoint.resume=auto).

Writes OUT/comparison.md and .json (table and sweep), OUT/samples.md (generations side by side),
OUT/loss_curves.png, and per method its run
directory, evaluation report and logs under OUT/<method>/; the shared data build is OUT/data.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from hycam_ds.engine import telemetry as tags
from hycam_ds.engine.cli import Parser, UsageError, run_main
from hycam_ds.engine.run_dir import RunDir
from hycam_ds.eval.comparison import loss_plot, samples_markdown, sweep_table, table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from any directory


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    overrides: tuple[str, ...] = ()
    """train.py overrides that make this method; empty with `trains=False`."""
    lrs: tuple[float, ...] = ()
    """Learning-rate candidates of the sweep; the first is used without a sweep."""
    lr_from: str | None = None
    """An ablation: train at the learning rate chosen for this method."""
    trains: bool = True

    @property
    def slug(self) -> str:
        return self.name.replace(" ", "_").replace("=", "_").replace("(", "").replace(")", "")


# Full fine-tuning moves every weight and wants a far smaller learning rate than the adapters.
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("backbone", trains=False),
        Method("full", ("method=full",), (3e-5, 1e-5, 1e-4)),
        Method("lora", ("method=lora",), (1e-3, 3e-4, 3e-3)),
        Method("cam", ("method=cam",), (1e-3, 3e-4, 3e-3)),
        Method("hycam", ("method=hycam",), (1e-3, 3e-4, 3e-3)),
        Method("hycam (no balance loss)", ("method=hycam", "hycam.balance_weight=0.0"), lr_from="hycam"),
        # Beyond the paper: fewer and more experts than tasks, and the other modulation sites.
        Method("hycam (2 experts)", ("method=hycam", "hycam.num_specialized=2"), lr_from="hycam"),
        Method("hycam (8 experts)", ("method=hycam", "hycam.num_specialized=8"), lr_from="hycam"),
        Method("hycam (site=ffn)", ("method=hycam", "hycam.site=ffn"), lr_from="hycam"),
        Method("hycam (site=residual)", ("method=hycam", "hycam.site=residual"), lr_from="hycam"),
    )
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--backbone", help="a backbone: Hugging Face directory, .gguf file or hub id org/name[@revision]"
    )
    parser.add_argument("--backbone-name", help="or a backbone built in code (for smoke tests)")
    parser.add_argument("--recipe", default="data_pipeline/recipes/hycam5.yaml")
    parser.add_argument("--data-root", help="directory the recipe's paths are relative to (../shared/data)")
    parser.add_argument(
        "--exclude-tasks",
        help="comma-separated tasks of the recipe left out of the data build (held out: analyse them with "
        "launch/analyze_routing.py on a build that has them)",
    )
    parser.add_argument(
        "--template",
        choices=("alpaca", "chat"),
        default="alpaca",
        help="prompt format of the data (chat: the backbone's own chat template)",
    )
    parser.add_argument("--general-text", help="text for knowledge retention (default: DATA_ROOT/general if it exists)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of every trained method")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--warmup-steps", type=int, default=None, help="default: steps / 20")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--sweep-steps", type=int, default=0, help="steps of each learning-rate candidate (0: no sweep)"
    )
    parser.add_argument(
        "--sweep-eval-batches", type=int, default=None, help="eval-split batches that score a candidate (default: all)"
    )
    parser.add_argument(
        "--lrs", default="", help="candidates per method, e.g. 'hycam=1e-3,3e-4;full=1e-5' (first = no-sweep default)"
    )
    parser.add_argument(
        "--save-every", type=int, default=25, help="checkpoint interval of every training run (resume points)"
    )
    parser.add_argument("--max-examples", type=int, default=24, help="greedy generations per task")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument(
        "--ppl-rows", type=int, default=None, help="test-split packed rows for perplexity (default: all)"
    )
    parser.add_argument("--general-tokens", type=int, default=30_000)
    return parser.parse_args(argv)


@dataclasses.dataclass
class Plan:
    """Everything the stages share: arguments resolved once."""

    args: argparse.Namespace
    out: Path
    data_dir: Path
    general: str | None
    lrs: dict[str, tuple[float, ...]]


def run(cmd: list[str], log_path: Path) -> float:
    """Run a stage of the comparison, its output into a log file; returns wall seconds."""
    started = time.perf_counter()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        child = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        returncode = wait_for_stage(child)
    if returncode != 0:
        sys.exit(f"compare.py: {' '.join(cmd[:3])} ... failed (exit {returncode}); see {log_path}")
    return time.perf_counter() - started


def wait_for_stage(child: subprocess.Popen) -> int:
    """The stage's exit status. On Ctrl-C (the stage, in the same process group, got it too) or
    SIGTERM (forwarded to it) the stage is left to save its checkpoint and exit; then compare.py
    stops, and the same command resumes. subprocess.run would kill the stage before it saved."""
    stopped_by: list[str] = []

    def forward(signum, _frame):
        stopped_by.append(signal.Signals(signum).name)
        child.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                returncode = child.wait()
                break
            except KeyboardInterrupt:
                stopped_by.append("Ctrl-C")
                print("compare.py: interrupted; waiting for the running stage to save ...", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if stopped_by:
        sys.exit(f"compare.py: stopped by {stopped_by[0]}; run the same command again to resume")
    return returncode


def build_data(args: argparse.Namespace, out: Path, recipe: dict | None) -> Path:
    """One data build for every method (and the untouched backbone's evaluation); `recipe`: the
    recipe without --exclude-tasks' tasks (written to OUT/recipe.yaml), or None for --recipe itself."""
    data_dir = out / "data"
    if (data_dir / "manifest.json").is_file():
        return data_dir
    recipe_path = args.recipe
    if recipe is not None:
        import yaml

        recipe_path = str(out / "recipe.yaml")
        Path(recipe_path).write_text(yaml.safe_dump(recipe, sort_keys=False))
    cmd = [
        sys.executable,
        "-m",
        "data_pipeline",
        "build",
        "--recipe",
        recipe_path,
        "--out",
        str(data_dir),
        "--seq-len",
        str(args.seq_len),
        "--no-progress",
        "--workers",
        "2",
    ]
    cmd += ["--tokenizer", backbone_ref(args)] if args.backbone else ["--train-tokenizer"]
    if args.data_root:
        cmd += ["--data-root", args.data_root]
    if args.template != "alpaca":
        cmd += ["--template", args.template]
    print(f"compare.py: building the data into {data_dir} ...", flush=True)
    run(cmd, out / "data.build.log")
    return data_dir


def recipe_without(recipe: str, excluded: str) -> dict:
    """`recipe` without the tasks named in `excluded` (comma-separated), checked before anything is
    written; its own data_root, if any, made absolute so that a copy elsewhere reads the same files."""
    import yaml

    path = Path(recipe)
    raw = yaml.safe_load(path.read_text())
    names = [name.strip() for name in excluded.split(",") if name.strip()]
    known = [task["name"] for task in raw["tasks"]]
    unknown = [name for name in names if name not in known]
    if unknown or len(names) >= len(known):
        raise UsageError(f"--exclude-tasks {excluded}: the recipe {recipe} has tasks {known}; leave at least one")
    raw["tasks"] = [task for task in raw["tasks"] if task["name"] not in names]
    raw["name"] = f"{raw.get('name', path.stem)}-without-{'-'.join(names)}"
    if raw.get("data_root"):
        raw["data_root"] = str((path.parent / raw["data_root"]).resolve())
    return raw


def backbone_ref(args: argparse.Namespace) -> str:
    from data_pipeline.pretrained import parse_pretrained

    return str(parse_pretrained(args.backbone))  # a local path made absolute, a hub id as written


def train_command(plan: Plan, method: Method, run_dir: Path, lr: float, stop_at: int | None) -> list[str]:
    args = plan.args
    model = [f"model.path={backbone_ref(args)}"] if args.backbone else [f"model.name={args.backbone_name}"]
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 20)
    cmd = [
        sys.executable,
        "launch/train.py",
        f"run_dir={run_dir}",
        *model,
        f"data.dir={plan.data_dir}",
        *method.overrides,
        f"optim.lr={lr}",
        f"optim.max_steps={args.steps}",
        f"optim.warmup_steps={warmup}",
        f"optim.micro_batch_size={args.micro_batch}",
        f"optim.grad_accum={args.grad_accum}",
        f"model.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
        "logging.progress=false",
        f"checkpoint.save_every={args.save_every}",
        "checkpoint.resume=auto",
    ]
    if stop_at is not None:  # a sweep candidate: the whole schedule, scored on the eval split at stop_at
        cmd += [f"optim.stop_at_step={stop_at}", f"logging.eval_every={stop_at}"]
    else:
        cmd += ["logging.eval_every=0"]
    if args.sweep_eval_batches:
        cmd += [f"logging.eval_batches={args.sweep_eval_batches}"]
    return cmd


def metrics_rows(run_dir: Path) -> list[dict]:
    return RunDir(run_dir).metric_rows()


def eval_loss_at(run_dir: Path, step: int) -> float | None:
    """The eval-split loss the run logged at `step` (the last one, if a resumed run logged twice)."""
    rows = [r for r in metrics_rows(run_dir) if r["kind"] == "eval" and r["step"] == step]
    return rows[-1][tags.EVAL_LOSS] if rows else None


def sweep(plan: Plan, method: Method) -> dict:
    """Every candidate to the sweep step; returns {"lr": best, "candidates": [...]} (saved, reused)."""
    record_path = plan.out / method.slug / "sweep.json"
    if record_path.is_file():
        return json.loads(record_path.read_text())
    steps = plan.args.sweep_steps
    candidates = []
    for lr in plan.lrs[method.name]:
        run_dir = plan.out / method.slug / "sweep" / f"lr_{lr:g}"
        if eval_loss_at(run_dir, steps) is None:
            print(f"  {method.name}: lr {lr:g}, {steps} steps ...", flush=True)
            wall = run(train_command(plan, method, run_dir, lr, stop_at=steps), plan.out / f"{method.slug}.sweep.log")
            (run_dir / "timing.json").write_text(json.dumps({"train_seconds": wall}))
        loss = eval_loss_at(run_dir, steps)
        loss = loss if loss is not None and math.isfinite(loss) else float("inf")
        candidates.append(
            {
                "lr": lr,
                "eval_loss": loss,
                "run_dir": str(run_dir),
                "train_seconds": json.loads((run_dir / "timing.json").read_text())["train_seconds"],
            }
        )
        print(f"    eval loss {loss:.4f}", flush=True)
    best = min(candidates, key=lambda c: c["eval_loss"])
    record = {"lr": best["lr"], "steps": steps, "candidates": candidates}
    record_path.write_text(json.dumps(record, indent=1))
    return record


def train(plan: Plan, method: Method, chosen: dict) -> tuple[Path, float, dict | None]:
    """Train the method to the end; returns (run directory, training seconds, sweep record)."""
    slug_dir = plan.out / method.slug
    run_dir, timing = slug_dir / "run", slug_dir / "timing.json"
    record = None
    if method.lr_from:
        lr = chosen[method.lr_from]
    elif plan.args.sweep_steps:
        record = sweep(plan, method)
        lr = record["lr"]
    else:
        lr = plan.lrs[method.name][0]
    chosen[method.name] = lr
    if timing.is_file():
        return run_dir, json.loads(timing.read_text())["train_seconds"], record
    earlier = 0.0
    if record is not None:  # the winning candidate continues from its checkpoint: its time counts
        winner = next(c for c in record["candidates"] if c["lr"] == lr)
        earlier = winner["train_seconds"]
        if not run_dir.exists():
            shutil.copytree(winner["run_dir"], run_dir)
    print(f"  {method.name}: training at lr {lr:g} to step {plan.args.steps} ...", flush=True)
    wall = run(train_command(plan, method, run_dir, lr, stop_at=None), plan.out / f"{method.slug}.train.log")
    timing.write_text(json.dumps({"train_seconds": earlier + wall, "lr": lr}))
    return run_dir, earlier + wall, record


def evaluate(plan: Plan, method: Method, run_dir: Path | None) -> Path:
    eval_dir = plan.out / method.slug / "eval"
    if (eval_dir / "report.json").is_file():
        return eval_dir
    args = plan.args
    cmd = [
        sys.executable,
        "launch/evaluate.py",
        "--out",
        str(eval_dir),
        "--max-examples",
        str(args.max_examples),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--batch-size",
        str(args.eval_batch_size),
        "--no-progress",
    ]
    if args.ppl_rows:
        cmd += ["--max-ppl-rows", str(args.ppl_rows)]
    if run_dir is not None:
        cmd += ["--run-dir", str(run_dir)]
    else:  # the untouched backbone
        cmd += ["--data", str(plan.data_dir)]
        cmd += ["--backbone", backbone_ref(args)] if args.backbone else ["--backbone-name", args.backbone_name]
    if plan.general:
        cmd += ["--general-text", plan.general, "--general-tokens", str(args.general_tokens)]
    print(f"  {method.name}: evaluating ...", flush=True)
    run(cmd, plan.out / f"{method.slug}.eval.log")
    return eval_dir


def row(
    method: Method, run_dir: Path | None, eval_dir: Path, wall: float, lr: float | None, record: dict | None
) -> dict:
    report = json.loads((eval_dir / "report.json").read_text())
    if run_dir is None:
        trainable, total, curve = 0, None, []
    else:
        info = RunDir(run_dir).read_info()
        trainable, total = info.trainable_parameters, info.total_parameters
        curve = [(r["step"], r[tags.LM_LOSS]) for r in metrics_rows(run_dir) if r["kind"] == "train"]
    return {
        "method": method.name,
        "tasks": report["tasks"],
        "average": report["average"],
        "general_text": report.get("general_text"),
        "trainable": trainable,
        "total": total,
        "train_seconds": wall,
        "lr": lr,
        "sweep": record,
        "loss_curve": curve,
    }


def parse_lrs(text: str) -> dict[str, tuple[float, ...]]:
    lrs = {name: m.lrs for name, m in METHODS.items()}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, values = part.partition("=")
        if name not in METHODS or not METHODS[name].lrs:
            raise UsageError(
                f"--lrs: {name!r} is not a method with its own learning rate "
                f"({[n for n, m in METHODS.items() if m.lrs]})"
            )
        try:
            lrs[name] = tuple(float(v) for v in values.split(","))
        except ValueError:
            raise UsageError(f"--lrs: {part!r} is not name=lr[,lr...]") from None
    return lrs


def make_plan(args: argparse.Namespace) -> Plan:
    if not (args.backbone or args.backbone_name):
        raise UsageError("give --backbone or --backbone-name")
    names = args.methods.split(",")
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise UsageError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    for name in names:
        source = METHODS[name].lr_from
        if source and source not in names:
            raise UsageError(f"{name!r} takes the learning rate chosen for {source!r}: include it in --methods")
    lrs = parse_lrs(args.lrs)  # every argument checked before anything is written
    recipe = recipe_without(args.recipe, args.exclude_tasks) if args.exclude_tasks else None
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    general = args.general_text
    if general is None and args.data_root and (Path(args.data_root) / "general").is_dir():
        general = str(Path(args.data_root) / "general")
    return Plan(args, out, build_data(args, out, recipe), general, lrs)


def main(argv: list[str] | None = None) -> int:
    return run_main("compare.py", lambda: _main(sys.argv[1:] if argv is None else argv))


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    rows, chosen = [], {}
    for name in args.methods.split(","):
        method = METHODS[name]
        print(f"compare.py: {name} ...", flush=True)
        run_dir, wall, lr, record = None, 0.0, None, None
        if method.trains:
            run_dir, wall, record = train(plan, method, chosen)
            lr = chosen[name]
        rows.append(row(method, run_dir, evaluate(plan, method, run_dir), wall, lr, record))
        avg = rows[-1]["average"]
        print(
            f"  average ppl {avg['ppl']:.2f}, BLEU-4 {avg['bleu4']:.2f}, ROUGE-L {avg['rougeL']:.2f}, {wall:.0f} s",
            flush=True,
        )
    (plan.out / "comparison.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2))
    (plan.out / "comparison.md").write_text(table(rows) + "\n" + sweep_table(rows))
    sample_files = {r["method"]: plan.out / METHODS[r["method"]].slug / "eval" / "samples.json" for r in rows}
    (plan.out / "samples.md").write_text(samples_markdown(sample_files))
    loss_plot(rows, plan.out / "loss_curves.png")
    print(table(rows))
    print(sweep_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
