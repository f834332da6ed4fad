"""The `trioflow` command, in this process (click's CliRunner): arguments, output, errors.

The command's end-to-end behaviour against running flows, in processes of
their own, is in ``tests/test_cli_processes.py``.
"""

from __future__ import annotations

import json
import re
import socket
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner, Result

import trioflow
from tests._procs import sqlite_url
from trioflow.cli import ExitCode, cli
from trioflow.cli._run import METRICS_MISSING
from trioflow.cli._watch import read_status
from trioflow.stores import store_from_url
from trioflow.stores.memory import MemoryStore
from trioflow.stores.sqlite._schema import MIGRATIONS, SCHEMA_VERSION
from trioflow.testing._store_contract import make_letter

ROOT = Path(__file__).resolve().parent.parent

#: A one-line error, as every command prints it.
ERROR = re.compile(r"trioflow: error: [^\n]+\n")


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def assert_error(result: Result, code: ExitCode, *fragments: str) -> None:
    """The command failed with ``code`` and one line on stderr holding ``fragments``."""
    assert result.exit_code == code, result.output
    assert ERROR.fullmatch(result.stderr), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.fixture
def url(tmp_path: Path) -> str:
    """A SQLite store with events, cursors, a consumer group and a dead letter.

    Consumers: ``audit`` (all 20 events), ``mailer`` (``mail`` events; the one
    with ``bad`` is a dead letter), ``billing`` (2 partitions).
    """
    store_url = sqlite_url(tmp_path / "events.db")
    app = trioflow.App(store=store_url)

    @app.consumer("audit")
    async def audit(event: trioflow.Event) -> None:
        pass

    @app.consumer("mailer", types={"mail"}, on_exhausted="dead-letter")
    async def mailer(event: trioflow.Event) -> None:
        if event.data == {"bad": True}:
            raise trioflow.Reject("no such mailbox")

    @app.consumer("billing", partitions=2)
    async def billing(event: trioflow.Event) -> None:
        pass

    async def fill() -> None:
        async with trioflow.open_flow(app) as flow:
            for n in range(1, 21):
                if n == 7:
                    await flow.publish("mail", {"bad": True})
                else:
                    await flow.publish("mail" if n % 3 == 0 else "tick", {"n": n}, key=f"k{n}")
            await flow.wait_idle()

    trio.run(fill)
    return store_url


def lines_of(result: Result) -> list[dict[str, object]]:
    return [json.loads(line) for line in result.stdout.splitlines()]


# --- tail ---------------------------------------------------------------------------------


def test_tail_prints_the_last_ten_events_as_json_lines(url: str) -> None:
    result = invoke("tail", "--store", url)
    assert result.exit_code == 0, result.output
    events = lines_of(result)
    assert [event["seq"] for event in events] == list(range(11, 21))
    first = events[0]
    assert set(first) == {"seq", "id", "type", "key", "created_at", "data"}
    assert (first["type"], first["key"], first["data"]) == ("tick", "k11", {"n": 11})


@pytest.mark.parametrize(
    ("options", "seqs"),
    [
        (["--last", "3"], [18, 19, 20]),
        (["--last", "0"], []),
        (["--from", "19"], [19, 20]),
        (["--from", "99"], []),
        (["--last", "2", "--type", "mail"], [15, 18]),
        (["--from", "1", "--type", "mail", "--type", "nothing"], [3, 6, 7, 9, 12, 15, 18]),
        (["--last", "100"], list(range(1, 21))),
    ],
)
def test_tail_starts_where_asked_and_filters_by_type(
    url: str, options: list[str], seqs: list[int]
) -> None:
    result = invoke("tail", "--store", url, *options)
    assert result.exit_code == 0, result.output
    assert [event["seq"] for event in lines_of(result)] == seqs


# --- dead letters -------------------------------------------------------------------------


def test_dead_letters_are_listed_requeued_and_discarded(url: str) -> None:
    listed = invoke("dead-letters", "list", "--store", url)
    assert listed.exit_code == 0, listed.output
    assert "1 dead letter(s)" in listed.stdout
    assert re.search(r"mailer +7 +mail +rejected +1 .* parked +trioflow.Reject", listed.stdout)
    (letter,) = json.loads(
        invoke("dead-letters", "list", "mailer", "--json", "--store", url).stdout
    )
    assert (letter["consumer"], letter["seq"], letter["due_at"]) == ("mailer", 7, None)
    assert letter["message"] == "no such mailbox"
    assert invoke("dead-letters", "list", "audit", "--store", url).stdout == (
        "no dead letters of 'audit'\n"
    )
    missing = invoke("dead-letters", "requeue", "mailer", "7", "8", "--store", url)
    assert_error(missing, ExitCode.USAGE, "no dead letter at seq 8", "nothing was changed")
    neither = invoke("dead-letters", "requeue", "mailer", "--store", url)
    assert_error(neither, ExitCode.USAGE, "or --all")
    requeued = invoke("dead-letters", "requeue", "mailer", "7", "--after", "60", "--store", url)
    assert requeued.stdout == "requeued 1 dead letter(s) of 'mailer'\n"
    assert requeued.stderr == ""  # no flow runs it: it finds them when it starts
    (letter,) = json.loads(invoke("dead-letters", "list", "--json", "--store", url).stdout)
    assert letter["due_at"] is not None
    discarded = invoke("dead-letters", "discard", "mailer", "--all", "--store", url)
    assert discarded.stdout == "discarded 1 dead letter(s) of 'mailer'\n"
    assert invoke("dead-letters", "list", "--json", "--store", url).stdout == "[]\n"


def test_requeueing_the_letters_of_a_consumer_a_flow_runs_says_when_they_are_handled(
    url: str,
) -> None:
    # That flow is not told: it finds them at its next look.
    claim(url, "host:42:abcd", ["mailer"])
    requeued = invoke("dead-letters", "requeue", "mailer", "--all", "--store", url)
    assert requeued.stdout == "requeued 1 dead letter(s) of 'mailer'\n", requeued.output
    assert requeued.stderr == (
        "note: 'mailer' runs in a flow (host:42:abcd), which looks for requeued letters every 5s\n"
    )


@pytest.mark.parametrize(
    "args",
    [
        ["list", "mailr"],
        ["list", "mailr", "--json"],
        ["requeue", "mailr", "--all"],
        ["discard", "mailr", "--all"],
        ["discard", "billing/7", "--all"],
    ],
)
def test_dead_letters_of_a_consumer_the_store_does_not_know_are_refused(
    url: str, args: list[str]
) -> None:
    # A mistyped name must not look like a consumer without dead letters.
    result = invoke("dead-letters", *args, "--store", url)
    assert_error(
        result, ExitCode.USAGE, f"knows no consumer named {args[1]!r}; it knows 'audit', 'billing'"
    )


def test_dead_letters_of_a_known_consumer_or_partition_without_any_are_none(url: str) -> None:
    for name in ("audit", "billing", "billing/1"):
        listed = invoke("dead-letters", "list", name, "--store", url)
        assert listed.stdout == f"no dead letters of {name!r}\n", listed.output
        discarded = invoke("dead-letters", "discard", name, "--all", "--store", url)
        assert discarded.stdout == f"discarded 0 dead letter(s) of {name!r}\n", discarded.output


def test_the_json_outputs_have_the_fields_the_docs_show(url: str) -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    section = doc.split("### Output for scripts")[1].split("\n### ")[0]
    status_doc, event_doc, letters_doc = (
        json.loads(block) for block in re.findall(r"```json\n(.*?)```", section, re.DOTALL)
    )
    status = json.loads(invoke("status", "--json", "--store", url).stdout)
    assert status.keys() == status_doc.keys()
    assert {tuple(row) for row in status["consumers"]} == {tuple(status_doc["consumers"][0])}
    (event,) = lines_of(invoke("tail", "--last", "1", "--store", url))
    assert list(event) == list(event_doc)
    (letter,) = json.loads(invoke("dead-letters", "list", "--json", "--store", url).stdout)
    assert list(letter) == list(letters_doc[0])


# --- migrate ------------------------------------------------------------------------------


def test_migrate_creates_the_schema_and_check_says_whether_one_is_pending(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "new.db")
    pending = invoke("migrate", "--check", "--store", url)
    assert pending.exit_code == ExitCode.PENDING
    assert pending.stdout == (
        f"schema version none: a migration to version {SCHEMA_VERSION} is pending; "
        "`trioflow migrate` runs it\n"
    )
    assert not (tmp_path / "new.db").exists()
    migrated = invoke("migrate", "--store", url)
    assert (migrated.exit_code, migrated.stdout) == (
        0,
        f"schema version none -> {SCHEMA_VERSION}: migrated\n",
    )
    again = invoke("migrate", "--store", url)
    assert again.stdout == f"schema version {SCHEMA_VERSION}: up to date, nothing to do\n"
    assert (
        invoke("migrate", "--check", "--store", url).stdout
        == f"schema version {SCHEMA_VERSION}: up to date\n"
    )


def old_schema(path: Path) -> str:
    """The URL of a SQLite file as a trioflow of schema version 3 left it."""
    with sqlite3.connect(path) as db:
        for step in (1, 2, 3):
            for statement in MIGRATIONS[step]:
                db.execute(statement)
        db.execute("UPDATE trioflow_schema SET version = 3")
    return sqlite_url(path)


def test_migrate_check_sees_an_old_schema_and_refuses_a_newer_one(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    url = old_schema(path)
    pending = invoke("migrate", "--check", "--store", url)
    assert pending.exit_code == ExitCode.PENDING, pending.output
    assert f"schema version 3: a migration to version {SCHEMA_VERSION} is pending" in pending.stdout
    assert (
        invoke("migrate", "--store", url).stdout
        == f"schema version 3 -> {SCHEMA_VERSION}: migrated\n"
    )
    with sqlite3.connect(path) as db:
        db.execute("UPDATE trioflow_schema SET version = 99")
    newer = invoke("migrate", "--check", "--store", url)
    assert_error(
        newer,
        ExitCode.FAILED,
        f"schema version 99, newer than this trioflow knows ({SCHEMA_VERSION})",
    )


def test_commands_never_migrate_an_old_schema_they_look_at(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    # Flows of the trioflow that left it may still run on it.
    url = old_schema(path)
    for args in (["status"], ["tail"], ["prune", "--before", "2", "--dry-run"]):
        refused = invoke(*args, "--store", url)
        assert_error(
            refused,
            ExitCode.PENDING,
            f"has schema version 3, older than this trioflow's ({SCHEMA_VERSION})",
            "run `trioflow migrate`",
        )
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM trioflow_schema").fetchone() == (3,)
    assert invoke("migrate", "--store", url).exit_code == 0
    assert invoke("status", "--store", url).exit_code == 0


def test_migrate_says_a_memory_store_has_no_schema() -> None:
    result = invoke("migrate", "--store", "memory://")
    assert (result.exit_code, result.stdout) == (
        0,
        "memory:// keeps no schema: nothing to migrate\n",
    )


def test_the_help_lists_every_exit_status() -> None:
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    listed = re.findall(r"^ +(\d+) +\w", result.stdout.split("Exit statuses:")[1], re.MULTILINE)
    assert listed == [str(int(code)) for code in ExitCode] + ["130"]


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["tail", "--no-such-option"], "No such option '--no-such-option'"),
        (["no-such-command"], "No such command 'no-such-command'"),
        (["tail", "--from", "3", "--last", "2"], "give --from or --last, not both"),
        (["tail", "--last", "-1"], "Invalid value for '--last'"),
        (["tail", "--store", "mysql://db"], "unknown store URL 'mysql://db'"),
        (["status", "--store", "memory://"], "memory:// is a store inside one process"),
        (["tail", "--store", "memory://"], "name the store the App uses"),
        (["dead-letters", "requeue"], "Missing argument 'CONSUMER'"),
        (["run", "no_colon"], "'no_colon' is not MODULE:APP"),
        (["run", "tests.no_such_module:app"], "no module named 'tests.no_such_module'"),
        (["run", "examples.served_app:nothing"], "has no attribute 'nothing'"),
        (["run", "examples.served_app:audit"], "is a function, not a trioflow.App"),
        (["run", "examples.served_app:app", "--store", "memory:///x"], "takes no path"),
        (["run", "examples.served_app:app", "--log-level", "LOUD"], "'LOUD' is not one of"),
    ],
)
def test_bad_arguments_are_one_line_errors_with_the_usage_status(
    args: Sequence[str], fragment: str
) -> None:
    assert_error(invoke(*args), ExitCode.USAGE, fragment)


def test_an_unreachable_store_is_a_one_line_error_without_its_password(tmp_path: Path) -> None:
    # Port 1: nothing listens there, the connection is refused at once.
    secret = "postgresql://ann:s3cret-pw@127.0.0.1:1/db"
    result = invoke("tail", "--store", secret)
    assert_error(result, ExitCode.UNAVAILABLE, "cannot connect to PostgreSQL", "***@127.0.0.1:1")
    assert "s3cret" not in result.output
    nowhere = invoke("status", "--store", sqlite_url(tmp_path / "no-such-dir" / "x.db"))
    assert_error(nowhere, ExitCode.UNAVAILABLE, "holds no trioflow store")


@pytest.mark.parametrize("option", ["sslmode=sometimes", "target_session_attrs=any-old"])
def test_an_option_the_postgres_driver_refuses_is_a_bad_url(option: str) -> None:
    # asyncpg checks these as it connects, before any network: a mistake in
    # the URL, like a malformed one, not a failing store.
    result = invoke("status", "--store", f"postgresql://ann:s3cret-pw@127.0.0.1:1/db?{option}")
    assert_error(result, ExitCode.USAGE, "store URL postgresql://***@127.0.0.1:1/db", option)
    assert "s3cret" not in result.output


def test_a_metrics_port_in_use_is_named_in_a_one_line_error() -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = invoke(
            "run", "examples.served_app:app", "--store", "memory://", "--metrics-port", port
        )
    assert_error(
        result, ExitCode.FAILED, f"--metrics-port {port}: cannot listen on it", "choose a free"
    )


def test_a_store_never_opened_is_not_created_by_looking_at_it(tmp_path: Path) -> None:
    typo = tmp_path / "typo.db"
    result = invoke("tail", "--store", sqlite_url(typo))
    assert_error(result, ExitCode.UNAVAILABLE, "holds no trioflow store", "`trioflow migrate`")
    assert not typo.exists()


def test_the_store_comes_from_the_environment_without_store(url: str) -> None:
    result = invoke("tail", "--last", "1", env={"TRIOFLOW_STORE": url})
    assert [event["seq"] for event in lines_of(result)] == [20]


def test_metrics_port_without_the_metrics_extra_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Whether or not trioflow.metrics is installed here, its import fails.
    monkeypatch.setitem(__import__("sys").modules, "trioflow.metrics", None)
    result = invoke("run", "examples.served_app:app", "--metrics-port", "9100")
    assert_error(result, ExitCode.USAGE, "pip install 'trioflow[metrics]'")
    assert METRICS_MISSING in result.stderr


# --- status -------------------------------------------------------------------------------


def test_status_shows_one_row_per_consumer_and_partition(url: str) -> None:
    document = json.loads(invoke("status", "--json", "--store", url).stdout)
    assert document["head"] == 20
    rows = {row["consumer"]: row for row in document["consumers"]}
    assert list(rows) == ["audit", "billing/0", "billing/1", "mailer"]
    assert set(rows["audit"]) == {
        "consumer",
        "cursor",
        "head",
        "lag",
        "updated_at",
        "owner",
        "dead_letters",
    }
    # The flow stopped gracefully: cursors at the head, leases released.
    assert [(r["cursor"], r["lag"], r["owner"]) for r in rows.values()] == [(20, 0, None)] * 4
    assert [r["dead_letters"] for r in rows.values()] == [0, 0, 0, 1]
    assert all(r["updated_at"] is not None for r in rows.values())
    table = invoke("status", "--store", url).stdout.splitlines()
    assert table[0].strip() == "4 consumer(s), head 20"
    assert table[1].split() == [
        "CONSUMER",
        "CURSOR",
        "LAG",
        "LAST",
        "COMMIT",
        "OWNER",
        "DEAD",
        "LETTERS",
    ]
    assert re.fullmatch(r" *mailer +20 +0 +\S+ \S+Z \(\d+s ago\) +- +1 *", table[-1]), table


class _NoLetterReads(MemoryStore):
    """A store whose letters must not be read, only counted."""

    async def dead_letters(self, consumer: str | None = None) -> list[trioflow.DeadLetter]:
        raise AssertionError("status read every dead letter to count them")


async def test_status_counts_dead_letters_without_reading_them() -> None:
    store = _NoLetterReads()
    async with store.open():
        for consumer, seq in [("mailer", 1), ("mailer", 2), ("audit", 2)]:
            await store.record_dead_letter(make_letter(consumer, seq), cursor=None)
        rows = await read_status(store)
    assert {row.consumer: row.dead_letters for row in rows} == {"audit": 1, "mailer": 2}


def test_status_names_the_holder_of_a_lease(url: str) -> None:
    async def hold() -> None:
        store = store_from_url(url)
        async with store.open():
            await store.claim_leases("host:42:abcd", ["audit"], 600)

    trio.run(hold)
    document = json.loads(invoke("status", "--json", "--store", url).stdout)
    owners = {row["consumer"]: row["owner"] for row in document["consumers"]}
    assert owners == {"audit": "host:42:abcd", "billing/0": None, "billing/1": None, "mailer": None}


# --- consumers ----------------------------------------------------------------------------


def cursors_of(url: str) -> dict[str, int]:
    async def read() -> dict[str, int]:
        store = store_from_url(url)
        async with store.open():
            return await store.load_cursors()

    return trio.run(read)


def test_reset_moves_a_cursor_back_and_forth_and_prints_both_positions(url: str) -> None:
    back = invoke("consumers", "reset", "audit", "--to", "5", "--store", url)
    assert (back.exit_code, back.stdout) == (0, "audit: 20 -> 5\n")
    assert cursors_of(url)["audit"] == 5
    earliest = invoke("consumers", "reset", "audit", "--to", "earliest", "--store", url)
    assert earliest.stdout == "audit: 5 -> 0\n"
    latest = invoke("consumers", "reset", "audit", "--to", "latest", "--store", url)
    assert latest.stdout == "audit: 0 -> 20\n"
    group = invoke("consumers", "reset", "billing", "--to", "3", "--store", url)
    assert group.stdout == "billing/0: 20 -> 3\nbilling/1: 20 -> 3\n"
    assert cursors_of(url) == {"audit": 20, "billing/0": 3, "billing/1": 3, "mailer": 20}


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["reset", "audit", "--to", "21"], "--to 21: a cursor goes from 0 to the head, 20"),
        (["reset", "audit", "--to", "-1"], "--to '-1': give a sequence number"),
        (["reset", "nobody", "--to", "0"], "knows no consumer named 'nobody'; it knows 'audit'"),
        (["reset", "billing/1", "--to", "0"], "give the group's name"),
        (["reset", "audit"], "Missing option '--to'"),
        (["remove", "nobody"], "knows no consumer named 'nobody'"),
    ],
)
def test_consumers_refuse_bad_arguments(url: str, args: list[str], fragment: str) -> None:
    assert_error(invoke("consumers", *args, "--store", url), ExitCode.USAGE, fragment)
    assert cursors_of(url)["audit"] == 20


def claim(url: str, holder: str, keys: list[str]) -> list[trioflow.Lease]:
    """Claim the leases on ``keys`` for ``holder``, as a flow running them would."""

    async def claiming() -> list[trioflow.Lease]:
        store = store_from_url(url)
        async with store.open():
            return await store.claim_leases(holder, keys, 600)

    return trio.run(claiming)


def test_reset_is_refused_while_a_flow_holds_the_lease_unless_forced(url: str) -> None:
    (before,) = claim(url, "host:42:abcd", ["billing/1"])
    refused = invoke("consumers", "reset", "billing", "--to", "0", "--store", url)
    assert_error(
        refused,
        ExitCode.REFUSED,
        "consumer 'billing' runs in a flow (its lease is held: billing/1 by host:42:abcd)",
        "pass --force",
    )
    assert cursors_of(url)["billing/0"] == 20
    forced = invoke("consumers", "reset", "billing", "--to", "0", "--force", "--store", url)
    assert forced.stdout == "billing/0: 20 -> 0\nbilling/1: 20 -> 0\n"
    # The lease passed on: the old holder's token is stale, its writes fenced off;
    # the command released it, so a flow takes it again at once.
    (after,) = claim(url, "host:43:ef01", ["billing/1"])
    assert after.holder == "host:43:ef01"
    assert after.token > before.token + 1
    # Removing is refused while a flow runs it too.
    assert_error(
        invoke("consumers", "remove", "billing", "--store", url), ExitCode.REFUSED, "--force"
    )


def test_remove_forgets_the_cursors_and_dead_letters_of_a_consumer_or_group(url: str) -> None:
    removed = invoke("consumers", "remove", "mailer", "--store", url)
    assert removed.stdout == "removed consumer 'mailer' (1 cursor(s))\n"
    group = invoke("consumers", "remove", "billing", "--store", url)
    assert group.stdout == "removed consumer 'billing' (2 cursor(s))\n"
    assert cursors_of(url) == {"audit": 20}
    assert invoke("dead-letters", "list", "--json", "--store", url).stdout == "[]\n"

    async def count_lease() -> list[str]:
        store = store_from_url(url)
        async with store.open():
            return [lease.key for lease in await store.leases()]

    # The group's partition count is let go of: it may come back with another.
    assert trio.run(count_lease) == []


# --- prune --------------------------------------------------------------------------------


def set_cursor(url: str, consumer: str, seq: int) -> None:
    async def move() -> None:
        store = store_from_url(url)
        async with store.open():
            await store.set_cursor(consumer, seq)

    trio.run(move)


def test_prune_is_refused_while_a_cursor_needs_the_events_and_deletes_what_all_passed(
    url: str,
) -> None:
    set_cursor(url, "laggard", 5)
    for extra in ([], ["--dry-run"]):
        refused = invoke("prune", "--before", "21", *extra, "--store", url)
        assert_error(
            refused,
            ExitCode.REFUSED,
            "would pass the cursors of consumer(s) 'laggard' (at 5)",
            "up to 5",
        )
    dry = invoke("prune", "--before", "21", "--only-passed", "--dry-run", "--store", url)
    assert dry.stdout == "would delete at most 5 event(s), up to seq 5, of seq 1 to 20\n"
    assert [e["seq"] for e in lines_of(invoke("tail", "--from", "1", "--store", url))][:1] == [1]
    passed = invoke("prune", "--before", "21", "--only-passed", "--batch-size", "2", "--store", url)
    assert passed.stdout == "deleted 5 event(s); the log holds seq 6 to 20\n", passed.output
    # Without a terminal, a prune of several batches says how far it has got.
    assert passed.stderr == "".join(
        f"pruning: {n} of at most 5 event(s) deleted\n" for n in (2, 4, 5)
    )
    assert invoke("consumers", "remove", "laggard", "--store", url).exit_code == 0
    # The dead letter of 'mailer' keeps its event (seq 7).
    rest = invoke("prune", "--before", "21", "--store", url)
    assert rest.stdout == "deleted 14 event(s); the log holds seq 7 to 20\n", rest.output
    assert rest.stderr == ""  # one batch: nothing to report on the way
    tail = invoke("tail", "--from", "1", "--store", url)
    assert [event["seq"] for event in lines_of(tail)] == [7]
    assert invoke("prune", "--before", "21", "--store", url).stdout == (
        "nothing to prune: the log holds seq 7 to 20\n"
    )
    # A cursor cannot be put where the events were pruned.
    behind = invoke("consumers", "reset", "audit", "--to", "3", "--store", url)
    assert_error(behind, ExitCode.USAGE, "--to 3: a cursor goes from 20 to the head, 20")


def test_prune_by_age_turns_the_age_into_a_sequence_number(url: str) -> None:
    fresh = invoke("prune", "--older-than", "1h30m", "--store", url)
    assert fresh.stdout == "nothing to prune: the log holds seq 1 to 20\n", fresh.output
    everything = invoke("prune", "--older-than", "0s", "--store", url)
    assert everything.stdout == "deleted 19 event(s); the log holds seq 7 to 20\n"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ([], "give --older-than DURATION or --before SEQ"),
        (["--before", "3", "--older-than", "1d"], "give --older-than DURATION or --before SEQ"),
        (["--older-than", "soon"], "'soon' is not a duration such as 7d"),
        (["--before", "0"], "Invalid value for '--before'"),
    ],
)
def test_prune_refuses_bad_arguments_before_opening_the_store(
    args: list[str], fragment: str
) -> None:
    assert_error(invoke("prune", *args), ExitCode.USAGE, fragment)
