"""The kernel fuzz run's tally (tests/test_kernel_fuzz.py): cases, mismatches, errors and the
variants hit, per op, and the summary printed at the end of the run.

Under pytest-xdist the fuzz tests run in worker processes, whose terminal summaries nobody sees:
each worker hands its tally to the controller (``conftest.py``: ``workeroutput``, then
``pytest_testnodedown``), which merges them here and prints one summary for the whole run.
"""
import collections
import os

PROFILE = os.environ.get("HYPERSEG_FUZZ_PROFILE", "ci")

# op -> Counter of "cases", "mismatches", "errors" and "<variant key>:<value>"
STATS = collections.defaultdict(collections.Counter)


def tally() -> dict:
    """This process's tally as plain dicts (what a worker sends to the controller)."""
    return {op: dict(counts) for op, counts in STATS.items()}


def merge(other: dict) -> None:
    """Add another process's ``tally()`` to this one's."""
    for op, counts in other.items():
        STATS[op].update(counts)


def summary_lines() -> list:
    """One line per op, then one for all ops; empty when no fuzz case ran."""
    if not STATS:
        return []
    lines = []
    everything = sum(STATS.values(), collections.Counter())
    for op, c in sorted(STATS.items()) + [("all ops", everything)]:
        hits = ", ".join(f"{k} {v}" for k, v in sorted(c.items()) if ":" in k and op != "all ops")
        lines.append(f"{op}: {c['cases']} cases, {c['mismatches']} mismatches, {c['errors']} errors"
                     + (f" ({hits})" if hits else ""))
    return lines
