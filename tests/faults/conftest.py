"""The fault-injection battery's results table: every test appends rows; the table is printed at
the end of the session (and copied into README)."""

import pytest

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
