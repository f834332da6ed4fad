"""The store contract's dead-letter tests can fail: each catches a broken store.

``tests/_mutant_stores.py`` runs the contract on the memory store and on
copies of it broken one way each (a cursor that does not move, unknown seqs
returned, times cut to milliseconds...). Run in a pytest process of its own,
every test of the dead-letter part must pass on the intact store, every mutant
must fail the test written to catch it, and every test must fail on one mutant
at least.
"""

from __future__ import annotations

import collections
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from tests._mutant_stores import MUTANTS

ROOT = Path(__file__).resolve().parent.parent

#: The tests of dead letters: those named for them, and the checkpoint test.
# (The transaction tests need a store that runs transactions: not these.)
SELECTION = "(dead_letter or every_method_is_a_checkpoint) and not transaction"

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


def run_suites(report: Path) -> dict[str, dict[str, str | None]]:
    """Run every suite of ``_mutant_stores``; per suite and test, the failure or None."""
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
            SELECTION,
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
    control = outcomes.pop("TestMemoryStore")
    assert len(control) >= 15, f"too few tests selected: {sorted(control)}"
    assert all(outcome is None for outcome in control.values()), control
    for mutant, catcher in MUTANTS.items():
        results = outcomes[f"Test{mutant.__name__}"]
        assert results.keys() == control.keys(), mutant
        failure = results[catcher]
        assert failure is not None, f"{catcher} passes on {mutant.__name__}: {mutant.__doc__}"
        # Failed on what it checks, not on a store or harness that broke.
        assert "AssertionError" in failure, (mutant.__name__, catcher, failure)
    caught_by = {
        name: sorted(suite for suite, results in outcomes.items() if results[name] is not None)
        for name in control
    }
    blind = [name for name, suites in caught_by.items() if not suites]
    assert not blind, f"tests that no mutant fails: {blind}"
