"""Shared test options: `--runslow` enables tests marked `slow`."""
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
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow variant: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def embedded_data(tmp_path_factory):
    """The embedded five-task corpus built once per session (seq 128, trained tokenizer)."""
    from data_pipeline import BuildConfig, build_dataset

    out = tmp_path_factory.mktemp("data") / "embedded"
    build_dataset(BuildConfig(recipe=str(REPO / "data_pipeline/recipes/embedded.yaml"), out=str(out),
                              train_tokenizer=True, vocab_size=3000, seq_len=128, progress=False))
    return out


# The fault-injection battery's results table (issue 7): tests in tests/faults and tests/slurm
# append rows; the table is printed at the end of the session and copied into README.
_ROWS = []


@pytest.fixture(scope="session")
def fault_table():
    """Append dicts {"item": "4 corrupt data", "case": str, "trials": int, "passed": int, "detail": str}."""
    return _ROWS


def pytest_terminal_summary(terminalreporter):
    if _ROWS:
        terminalreporter.write_line("")
        terminalreporter.write_line("| item | case | trials | passed | detail |")
        terminalreporter.write_line("|---|---|---|---|---|")
        for r in _ROWS:
            terminalreporter.write_line(f"| {r['item']} | {r['case']} | {r['trials']} | {r['passed']} | {r['detail']} |")


def _mapped_shm_paths() -> set[str]:
    """/dev/shm files some live process still has mapped (another test session's running job)."""
    import glob

    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                mapped.update(line.split(maxsplit=5)[5].strip() for line in f if "/dev/shm/" in line)
        except (OSError, IndexError):
            continue
    return mapped


@pytest.fixture(autouse=True)
def _release_leaked_shm():
    """Runs killed on purpose (and DeepSpeed itself on CPU) leave /dev/shm all-reduce buffers
    behind, ~70 MB each: remove those that appeared during a test and no live process maps
    (a concurrent test session's job keeps its buffers)."""
    import glob

    before = set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"))
    yield
    leaked = set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*")) - before
    for path in leaked - _mapped_shm_paths() if leaked else ():
        try:
            os.unlink(path)
        except OSError:
            pass
