"""The store contract's dead-letter and retention tests can fail: each catches a broken store.

``tests/_mutant_stores.py`` runs the contract on the memory store and on
copies of it broken one way each (a cursor that does not move, unknown seqs
returned, times cut to milliseconds...). Run in a pytest process of its own,
every test of the dead-letter part must pass on the intact store, every mutant
must fail the test written to catch it, and every test must fail on one mutant
at least. The retention tests (cursors, resets, bounds, pruning) are held to the
same against the retention mutants.
"""

from __future__ import annotations

import collections
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from tests._mutant_stores import MUTANTS, RETENTION_MUTANTS
from trioflow.stores.memory import MemoryStore

ROOT = Path(__file__).resolve().parent.parent

#: The tests of dead letters: those named for them, and the checkpoint test.
# (The transaction tests need a store that runs transactions: not these.)
SELECTION = (
    "(dead_letter or every_method_is_a_checkpoint) and not transaction and not ("
    # The retention mutants are broken only where retention is.
    + " or ".join(f"Test{mutant.__name__}" for mutant in RETENTION_MUTANTS)
    + ")"
)

#: The tests of retention (cursors, resets, bounds, seq_before, pruning), by full
#: name (a part of one, "prune", would pick every test of a suite named for it),
#: run on the control and the retention mutants only.
RETENTION_TESTS = (
    "test_log_bounds_of_an_empty_and_a_growing_log",
    "test_cursors_lists_every_cursor_by_code_point_with_its_time",
    "test_set_cursor_moves_a_cursor_either_way_and_returns_the_previous",
    "test_set_cursor_refuses_a_position_outside_the_log",
    "test_prune_deletes_the_oldest_events_up_to_through_in_batches",
    "test_prune_keeps_every_event_a_cursor_needs",
    "test_prune_keeps_every_event_a_letter_refers_to",
    "test_pruning_every_event_keeps_the_head_and_the_numbering",
    "test_pruning_and_resets_survive_reopening",
    "test_seq_before_finds_the_last_event_committed_before_a_time",
    "test_a_reset_racing_a_prune_never_loses_an_event_it_needs",
    "test_random_pruning_never_deletes_what_a_cursor_or_letter_needs",
)
RETENTION_SELECTION = (
    f"({' or '.join(RETENTION_TESTS)}) and (TestMemoryStore or "
    + " or ".join(f"Test{mutant.__name__}" for mutant in RETENTION_MUTANTS)
    + ")"
)

# Runs pytest with Hypothesis's shrinking off: a mutant's failure needs no
# minimal example, and shrinking one takes seconds.
_RUN = """
import sys

import pytest


class NoShrinking:
    def pytest_configure(self, config):
        from hypothesis import Phase, settings

        settings.register_profile(
            "mutants", phases=[Phase.explicit, Phase.generate], database=None
        )
        settings.load_profile("mutants")


sys.exit(pytest.main(sys.argv[1:], plugins=[NoShrinking()]))
"""


def run_suites(report: Path, selection: str = SELECTION) -> dict[str, dict[str, str | None]]:
    """Run the suites of ``_mutant_stores`` on the tests ``selection`` picks; per suite
    and test, the failure or None."""
    subprocess.run(
        [
            sys.executable,
            "-c",
            _RUN,
            "tests/_mutant_stores.py",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            selection,
            # The same examples each run: which tests catch which mutant never varies.
            "--hypothesis-seed=0",
            f"--junitxml={report}",
        ],
        cwd=ROOT,
        capture_output=True,
        check=False,
        timeout=600,
    )
    outcomes: dict[str, dict[str, str | None]] = collections.defaultdict(dict)
    for case in ElementTree.parse(report).iter("testcase"):
        suite = case.get("classname", "").rpartition(".")[2]
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        if case.find("skipped") is not None:
            outcome: str | None = "skipped"
        elif failure is not None:
            outcome = failure.get("message", "failed")
        else:
            outcome = None
        outcomes[suite][case.get("name", "")] = outcome
    return outcomes


def test_every_dead_letter_test_catches_a_mutant_and_every_mutant_is_caught(
    tmp_path: Path,
) -> None:
    outcomes = run_suites(tmp_path / "report.xml")
    check_outcomes(outcomes, MUTANTS, at_least=15)


def test_every_retention_test_catches_a_mutant_and_every_mutant_is_caught(
    tmp_path: Path,
) -> None:
    outcomes = run_suites(tmp_path / "report.xml", RETENTION_SELECTION)
    assert set(outcomes) == {"TestMemoryStore"} | {f"Test{m.__name__}" for m in RETENTION_MUTANTS}
    check_outcomes(outcomes, RETENTION_MUTANTS, at_least=len(RETENTION_TESTS))


def check_outcomes(
    outcomes: dict[str, dict[str, str | None]],
    mutants: dict[type[MemoryStore], str],
    *,
    at_least: int,
) -> None:
    """The control passes every test; each mutant fails its catcher; each test fails somewhere."""
    control = outcomes.pop("TestMemoryStore")
    assert len(control) >= at_least, f"too few tests selected: {sorted(control)}"
    assert all(outcome is None for outcome in control.values()), control
    for mutant, catcher in mutants.items():
        results = outcomes[f"Test{mutant.__name__}"]
        assert results.keys() == control.keys(), mutant
        failure = results[catcher]
        assert failure is not None, f"{catcher} passes on {mutant.__name__}: {mutant.__doc__}"
        # Failed on what it checks (an assert, or an error it expected and did not
        # get), not on a store or harness that broke.
        assert "AssertionError" in failure or "DID NOT RAISE" in failure, (
            mutant.__name__,
            catcher,
            failure,
        )
    caught_by = {
        name: sorted(suite for suite, results in outcomes.items() if results[name] is not None)
        for name in control
    }
    blind = [name for name, suites in caught_by.items() if not suites]
    assert not blind, f"tests that no mutant fails: {blind}"
