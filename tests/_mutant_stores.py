"""Memory stores each broken in one way, and the store contract run on each.

`tests/test_contract_mutants.py` runs this module in a pytest process of its
own (its name keeps the usual runs from collecting it) and checks that the
contract's dead-letter tests catch every dead-letter mutant, its retention
tests every retention mutant, and that each of those tests catches one at
least: a test that cannot fail checks nothing. The intact
`MemoryStore` runs as the control, which must pass.

Every suite here is the memory store's (``tests/test_store_contract.py``) on
another class, and persistent: "reopening" a memory store opens the same
instance again, so the tests of what survives reopening run too.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
from collections.abc import AsyncIterator, Sequence

import attrs
import trio

from tests import test_store_contract
from trioflow._dead_letters import DeadLetter
from trioflow.stores import CursorInfo, LogBounds
from trioflow.stores.memory import MemoryStore

_PLUS_TWO = datetime.timezone(datetime.timedelta(hours=2))


# -- record_dead_letter ---------------------------------------------------------------


class NoCursor(MemoryStore):
    """Records the letter, never its cursor."""

    async def record_dead_letter(
        self, letter: DeadLetter, *, cursor: int | None, fence: int | None = None
    ) -> None:
        await super().record_dead_letter(letter, cursor=None)


class CursorBack(MemoryStore):
    """Sets the cursor even below the stored one."""

    async def record_dead_letter(
        self, letter: DeadLetter, *, cursor: int | None, fence: int | None = None
    ) -> None:
        await super().record_dead_letter(letter, cursor=None)
        if cursor is not None:
            self._cursors[letter.consumer] = cursor


class CursorFromNone(MemoryStore):
    """Takes a cursor of None for the letter's seq."""

    async def record_dead_letter(
        self, letter: DeadLetter, *, cursor: int | None, fence: int | None = None
    ) -> None:
        await super().record_dead_letter(letter, cursor=letter.seq if cursor is None else cursor)


class CursorFirst(MemoryStore):
    """Moves the cursor, then keeps the letter, in two steps."""

    async def record_dead_letter(
        self, letter: DeadLetter, *, cursor: int | None, fence: int | None = None
    ) -> None:
        await self.commit_cursors({} if cursor is None else {letter.consumer: cursor})
        await super().record_dead_letter(letter, cursor=None)


class LetterFirst(MemoryStore):
    """Keeps the letter, then moves the cursor, in two steps."""

    async def record_dead_letter(
        self, letter: DeadLetter, *, cursor: int | None, fence: int | None = None
    ) -> None:
        await super().record_dead_letter(letter, cursor=None)
        await self.commit_cursors({} if cursor is None else {letter.consumer: cursor})


class FirstLetterWins(MemoryStore):
    """Keeps the first letter of a consumer and seq: recording again changes nothing."""

    async def record_dead_letter(
        self, letter: DeadLetter, *, cursor: int | None, fence: int | None = None
    ) -> None:
        kept = self._dead.get((letter.consumer, letter.seq), letter)
        await super().record_dead_letter(kept, cursor=cursor)


class KeepsDueAt(MemoryStore):
    """Recording a requeued letter again keeps it requeued."""

    async def record_dead_letter(
        self, letter: DeadLetter, *, cursor: int | None, fence: int | None = None
    ) -> None:
        old = self._dead.get((letter.consumer, letter.seq))
        if old is not None and old.due_at is not None:
            letter = attrs.evolve(letter, due_at=old.due_at)
        await super().record_dead_letter(letter, cursor=cursor)


class DropsDueAt(MemoryStore):
    """Parks every letter recorded, whatever its ``due_at``."""

    async def record_dead_letter(
        self, letter: DeadLetter, *, cursor: int | None, fence: int | None = None
    ) -> None:
        await super().record_dead_letter(attrs.evolve(letter, due_at=None), cursor=cursor)


class Milliseconds(MemoryStore):
    """Keeps times to the millisecond, as some databases do."""

    async def record_dead_letter(
        self, letter: DeadLetter, *, cursor: int | None, fence: int | None = None
    ) -> None:
        first, last = letter.first_failed_at, letter.last_failed_at
        letter = attrs.evolve(
            letter,
            first_failed_at=first.replace(microsecond=first.microsecond // 1000 * 1000),
            last_failed_at=last.replace(microsecond=last.microsecond // 1000 * 1000),
        )
        await super().record_dead_letter(letter, cursor=cursor)


class ShortTraceback(MemoryStore):
    """Keeps 8 KiB of a traceback."""

    async def record_dead_letter(
        self, letter: DeadLetter, *, cursor: int | None, fence: int | None = None
    ) -> None:
        letter = attrs.evolve(letter, traceback=letter.traceback[-8192:])
        await super().record_dead_letter(letter, cursor=cursor)


# -- dead_letters -------------------------------------------------------------------


class Unsorted(MemoryStore):
    """Lists letters in the order they were first recorded."""

    async def dead_letters(self, consumer: str | None = None) -> list[DeadLetter]:
        await trio.lowlevel.checkpoint()
        return [letter for letter in self._dead.values() if consumer in (None, letter.consumer)]


class SeqsAsText(MemoryStore):
    """Sorts seqs as text (1, 100, 2), as a text column would."""

    async def dead_letters(self, consumer: str | None = None) -> list[DeadLetter]:
        letters = await super().dead_letters(consumer)
        return sorted(letters, key=lambda letter: (letter.consumer, str(letter.seq)))


class CaseInsensitive(MemoryStore):
    """Sorts consumers as a locale's collation might ("a" before "B")."""

    async def dead_letters(self, consumer: str | None = None) -> list[DeadLetter]:
        letters = await super().dead_letters(consumer)
        return sorted(letters, key=lambda letter: (letter.consumer.lower(), letter.seq))


class Unfiltered(MemoryStore):
    """Lists every consumer's letters whatever ``consumer`` says."""

    async def dead_letters(self, consumer: str | None = None) -> list[DeadLetter]:
        return await super().dead_letters()


# -- dead_letter_counts -------------------------------------------------------------


class CountsParkedOnly(MemoryStore):
    """Counts only the letters that are parked, not those requeued."""

    async def dead_letter_counts(self) -> dict[str, int]:
        counts = collections.Counter(
            consumer for (consumer, _), letter in self._dead.items() if letter.due_at is None
        )
        await trio.lowlevel.checkpoint()
        return dict(counts)


class CountsFolded(MemoryStore):
    """Counts consumers whose names differ only in case as one, as a collation might."""

    async def dead_letter_counts(self) -> dict[str, int]:
        counts = await super().dead_letter_counts()
        folded: dict[str, int] = {}
        for consumer, count in counts.items():
            name = next((n for n in folded if n.lower() == consumer.lower()), consumer)
            folded[name] = folded.get(name, 0) + count
        return folded


# -- earliest_due_at ----------------------------------------------------------------


class EarliestOfAll(MemoryStore):
    """Answers with the earliest due time of every consumer's letters."""

    async def earliest_due_at(self, consumer: str) -> datetime.datetime | None:
        times = [letter.due_at for letter in self._dead.values() if letter.due_at is not None]
        await trio.lowlevel.checkpoint()
        return min(times, default=None)


class EarliestNotYetDue(MemoryStore):
    """Leaves out the letters that have come due already."""

    async def earliest_due_at(self, consumer: str) -> datetime.datetime | None:
        now = self._now()
        times = [
            letter.due_at
            for (name, _), letter in self._dead.items()
            if name == consumer and letter.due_at is not None and letter.due_at > now
        ]
        await trio.lowlevel.checkpoint()
        return min(times, default=None)


# -- requeue_dead_letters -------------------------------------------------------------


class RequeueReturnsAsked(MemoryStore):
    """Returns every seq asked for, letters or not."""

    async def requeue_dead_letters(
        self, consumer: str, seqs: Sequence[int], *, after: float = 0.0
    ) -> list[int]:
        await super().requeue_dead_letters(consumer, seqs, after=after)
        return sorted(set(seqs))


class RequeueReturnsRepeats(MemoryStore):
    """Returns the letters found in the order asked, repeats included."""

    async def requeue_dead_letters(
        self, consumer: str, seqs: Sequence[int], *, after: float = 0.0
    ) -> list[int]:
        await super().requeue_dead_letters(consumer, seqs, after=after)
        return [seq for seq in seqs if (consumer, seq) in self._dead]


class RequeueAnyConsumer(MemoryStore):
    """Requeues every consumer's letters of those seqs."""

    async def requeue_dead_letters(
        self, consumer: str, seqs: Sequence[int], *, after: float = 0.0
    ) -> list[int]:
        found = await super().requeue_dead_letters(consumer, seqs, after=after)
        for name in {name for name, _ in self._dead} - {consumer}:
            await super().requeue_dead_letters(name, seqs, after=after)
        return found


class RequeueNow(MemoryStore):
    """Hands letters back at once, whatever ``after`` says."""

    async def requeue_dead_letters(
        self, consumer: str, seqs: Sequence[int], *, after: float = 0.0
    ) -> list[int]:
        return await super().requeue_dead_letters(consumer, seqs)


class RequeueMilliseconds(MemoryStore):
    """Reads ``after`` as milliseconds."""

    async def requeue_dead_letters(
        self, consumer: str, seqs: Sequence[int], *, after: float = 0.0
    ) -> list[int]:
        return await super().requeue_dead_letters(consumer, seqs, after=after / 1000)


class RequeueOnce(MemoryStore):
    """Leaves a letter already requeued at its first time."""

    async def requeue_dead_letters(
        self, consumer: str, seqs: Sequence[int], *, after: float = 0.0
    ) -> list[int]:
        parked = [seq for seq in seqs if (consumer, seq) in self._dead]
        parked = [seq for seq in parked if self._dead[consumer, seq].due_at is None]
        await super().requeue_dead_letters(consumer, parked, after=after)
        return sorted({seq for seq in seqs if (consumer, seq) in self._dead})


class RequeueNotUTC(MemoryStore):
    """Gives ``due_at`` in UTC+2 (the same moment, another offset)."""

    async def requeue_dead_letters(
        self, consumer: str, seqs: Sequence[int], *, after: float = 0.0
    ) -> list[int]:
        found = await super().requeue_dead_letters(consumer, seqs, after=after)
        for seq in found:
            letter = self._dead[consumer, seq]
            assert letter.due_at is not None
            self._dead[consumer, seq] = attrs.evolve(
                letter, due_at=letter.due_at.astimezone(_PLUS_TWO)
            )
        return found


# -- due_dead_letters ---------------------------------------------------------------


class DueParked(MemoryStore):
    """Counts parked letters as due too."""

    async def due_dead_letters(self, consumer: str) -> list[DeadLetter]:
        letters = await self.dead_letters(consumer)
        due = {letter.seq for letter in await super().due_dead_letters(consumer)}
        return [letter for letter in letters if letter.due_at is None or letter.seq in due]


class DueAnyTime(MemoryStore):
    """Counts every requeued letter as due, even one due in an hour."""

    async def due_dead_letters(self, consumer: str) -> list[DeadLetter]:
        letters = await self.dead_letters(consumer)
        return [letter for letter in letters if letter.due_at is not None]


class DueNewestFirst(MemoryStore):
    """Returns due letters by descending seq."""

    async def due_dead_letters(self, consumer: str) -> list[DeadLetter]:
        return list(reversed(await super().due_dead_letters(consumer)))


class DueNoCheckpoint(MemoryStore):
    """``due_dead_letters`` never yields to the scheduler."""

    async def due_dead_letters(self, consumer: str) -> list[DeadLetter]:
        now = datetime.datetime.now(datetime.UTC)
        return [
            letter
            for key, letter in sorted(self._dead.items())
            if key[0] == consumer and letter.due_at is not None and letter.due_at <= now
        ]


# -- discard_dead_letters and forget_consumer -----------------------------------------


class DiscardReturnsAsked(MemoryStore):
    """Returns every seq asked for, letters or not."""

    async def discard_dead_letters(self, consumer: str, seqs: Sequence[int]) -> list[int]:
        await super().discard_dead_letters(consumer, seqs)
        return sorted(set(seqs))


class DiscardAnyConsumer(MemoryStore):
    """Deletes every consumer's letters of those seqs."""

    async def discard_dead_letters(self, consumer: str, seqs: Sequence[int]) -> list[int]:
        found = await super().discard_dead_letters(consumer, seqs)
        for name in {name for name, _ in self._dead} - {consumer}:
            await super().discard_dead_letters(name, seqs)
        return found


class ForgetKeepsCursor(MemoryStore):
    """Forgets a consumer's letters but not its cursor."""

    async def forget_consumer(self, consumer: str) -> None:
        cursor = self._cursors.get(consumer)
        await super().forget_consumer(consumer)
        if cursor is not None:
            self._cursors[consumer] = cursor


class ForgetKeepsLetters(MemoryStore):
    """Forgets a consumer's cursor but not its letters."""

    async def forget_consumer(self, consumer: str) -> None:
        await trio.lowlevel.checkpoint()
        self._cursors.pop(consumer, None)


class ForgetByPrefix(MemoryStore):
    """Forgets every consumer whose name starts with the one given."""

    async def forget_consumer(self, consumer: str) -> None:
        names = {name for name, _ in self._dead} | set(self._cursors)
        for name in names:
            if name.startswith(consumer):
                await super().forget_consumer(name)
        await trio.lowlevel.checkpoint()


class ForgetNoCheckpoint(MemoryStore):
    """``forget_consumer`` never yields to the scheduler."""

    async def forget_consumer(self, consumer: str) -> None:
        self._cursors.pop(consumer, None)
        for key in [key for key in self._dead if key[0] == consumer]:
            del self._dead[key]


class LosesLettersOnReopen(MemoryStore):
    """Keeps dead letters until the store is opened again."""

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[None]:
        self._dead.clear()
        async with super().open():
            yield


# -- retention -------------------------------------------------------------------------


class PruneIgnoresCursors(MemoryStore):
    """Prunes up to the bound whatever the cursors say."""

    async def prune(self, through: int, *, limit: int) -> int:
        cursors = self._cursors
        self._cursors = {}
        try:
            return await super().prune(through, limit=limit)
        finally:
            self._cursors = cursors


class PruneIgnoresLetters(MemoryStore):
    """Prunes the events dead letters refer to too."""

    async def prune(self, through: int, *, limit: int) -> int:
        letters = self._dead
        self._dead = {}
        try:
            return await super().prune(through, limit=limit)
        finally:
            self._dead = letters


class PruneIgnoresLimit(MemoryStore):
    """Deletes everything it may in one call, however small the limit."""

    async def prune(self, through: int, *, limit: int) -> int:
        return await super().prune(through, limit=10**9)


class HeadGoesBack(MemoryStore):
    """Reports the highest event stored as the head: 0 once everything is pruned."""

    async def head(self) -> int:
        await trio.lowlevel.checkpoint()
        return self._events[-1].seq if self._events else 0


class ResetOnlyForward(MemoryStore):
    """Sets a cursor only forward, as a commit does."""

    async def set_cursor(self, consumer: str, seq: int) -> int | None:
        previous = self._cursors.get(consumer)
        await super().set_cursor(consumer, max(seq, previous or 0))
        return previous


class ResetBehindPruned(MemoryStore):
    """Lets a cursor be set behind the pruned log."""

    async def set_cursor(self, consumer: str, seq: int) -> int | None:
        pruned, self._pruned_through = self._pruned_through, 0
        try:
            return await super().set_cursor(consumer, seq)
        finally:
            self._pruned_through = pruned


class ResetChecksThenWaits(MemoryStore):
    """Checks the bounds, then yields, then writes: a prune slips between."""

    async def set_cursor(self, consumer: str, seq: int) -> int | None:
        await trio.lowlevel.checkpoint()
        if seq < self._pruned_through or seq > self._head:
            return await super().set_cursor(consumer, seq)
        await trio.lowlevel.checkpoint()
        previous = self._cursors.get(consumer)
        self._cursors[consumer] = seq
        self._cursor_times[consumer] = self._now()
        return previous


class CursorsByTime(MemoryStore):
    """Lists cursors in the order they were first stored, not by name."""

    async def cursors(self) -> list[CursorInfo]:
        listed = await super().cursors()
        order = list(self._cursors)
        return sorted(listed, key=lambda info: order.index(info.consumer))


class FirstIsHead(MemoryStore):
    """Says the first stored seq is the head when nothing is stored."""

    async def log_bounds(self) -> LogBounds:
        bounds = await super().log_bounds()
        return attrs.evolve(bounds, first=min(bounds.first, bounds.head))


class SeqBeforeInclusive(MemoryStore):
    """Counts an event committed at the very time as committed before it."""

    async def seq_before(self, time: datetime.datetime) -> int:
        return await super().seq_before(time + datetime.timedelta(microseconds=1))


class LosesPruningOnReopen(MemoryStore):
    """Forgets how far the log was pruned when it is opened again."""

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[None]:
        self._pruned_through = 0
        async with super().open():
            yield


#: Each retention mutant, and the contract test written to catch it.
RETENTION_MUTANTS: dict[type[MemoryStore], str] = {
    PruneIgnoresCursors: "test_prune_keeps_every_event_a_cursor_needs",
    PruneIgnoresLetters: "test_prune_keeps_every_event_a_letter_refers_to",
    PruneIgnoresLimit: "test_prune_deletes_the_oldest_events_up_to_through_in_batches",
    HeadGoesBack: "test_pruning_every_event_keeps_the_head_and_the_numbering",
    ResetOnlyForward: "test_set_cursor_moves_a_cursor_either_way_and_returns_the_previous",
    ResetBehindPruned: "test_set_cursor_refuses_a_position_outside_the_log",
    ResetChecksThenWaits: "test_a_reset_racing_a_prune_never_loses_an_event_it_needs",
    CursorsByTime: "test_cursors_lists_every_cursor_by_code_point_with_its_time",
    FirstIsHead: "test_log_bounds_of_an_empty_and_a_growing_log",
    SeqBeforeInclusive: "test_seq_before_finds_the_last_event_committed_before_a_time",
    LosesPruningOnReopen: "test_pruning_and_resets_survive_reopening",
}


#: Each mutant, and the contract test written to catch it (others may too).
MUTANTS: dict[type[MemoryStore], str] = {
    NoCursor: "test_dead_letter_moves_its_consumers_cursor_forward_never_back",
    CursorBack: "test_dead_letter_moves_its_consumers_cursor_forward_never_back",
    CursorFromNone: "test_dead_letter_moves_its_consumers_cursor_forward_never_back",
    CursorFirst: "test_a_peer_never_sees_a_dead_letters_cursor_without_the_letter",
    LetterFirst: "test_a_cancelled_dead_letter_records_its_cursor_too_or_nothing",
    FirstLetterWins: "test_dead_letter_recorded_again_replaces_the_first",
    KeepsDueAt: "test_dead_letter_recorded_again_replaces_the_first",
    DropsDueAt: "test_dead_letters_read_back_exactly",
    Milliseconds: "test_dead_letters_read_back_exactly",
    ShortTraceback: "test_dead_letters_read_back_exactly",
    Unsorted: "test_dead_letters_are_listed_by_consumer_then_seq",
    SeqsAsText: "test_dead_letters_are_listed_by_consumer_then_seq",
    CaseInsensitive: "test_dead_letters_are_listed_by_consumer_then_seq",
    Unfiltered: "test_dead_letters_are_listed_by_consumer_then_seq",
    CountsParkedOnly: "test_dead_letter_counts_agree_with_the_letters",
    CountsFolded: "test_dead_letter_counts_agree_with_the_letters",
    EarliestOfAll: "test_earliest_due_at_of_requeued_dead_letters_is_the_least",
    EarliestNotYetDue: "test_earliest_due_at_of_requeued_dead_letters_is_the_least",
    RequeueReturnsAsked: "test_requeue_dead_letters_returns_the_consumers_letters_it_found",
    RequeueReturnsRepeats: "test_requeue_dead_letters_returns_the_consumers_letters_it_found",
    RequeueAnyConsumer: "test_requeue_dead_letters_returns_the_consumers_letters_it_found",
    RequeueNow: "test_requeue_dead_letters_sets_due_at_by_the_store_clock",
    RequeueMilliseconds: "test_requeue_dead_letters_sets_due_at_by_the_store_clock",
    RequeueOnce: "test_requeue_dead_letters_sets_due_at_by_the_store_clock",
    RequeueNotUTC: "test_requeue_dead_letters_sets_due_at_by_the_store_clock",
    DueParked: "test_due_dead_letters_are_the_requeued_ones_whose_time_has_come",
    DueAnyTime: "test_due_dead_letters_are_the_requeued_ones_whose_time_has_come",
    DueNewestFirst: "test_due_dead_letters_are_the_requeued_ones_whose_time_has_come",
    DueNoCheckpoint: "test_every_method_is_a_checkpoint",
    DiscardReturnsAsked: "test_discard_dead_letters_deletes_the_consumers_letters_it_found",
    DiscardAnyConsumer: "test_discard_dead_letters_deletes_the_consumers_letters_it_found",
    ForgetKeepsCursor: "test_forget_consumer_deletes_its_cursor_and_dead_letters_only",
    ForgetKeepsLetters: "test_forget_consumer_deletes_its_cursor_and_dead_letters_only",
    ForgetByPrefix: "test_forget_consumer_deletes_its_cursor_and_dead_letters_only",
    ForgetNoCheckpoint: "test_every_method_is_a_checkpoint",
    LosesLettersOnReopen: "test_dead_letters_survive_reopening",
}


def _suite(store_class: type[MemoryStore]) -> type[test_store_contract.TestMemoryStore]:
    """The memory store's contract suite on ``store_class``, collected as ``Test<name>``."""
    name = f"Test{store_class.__name__}"
    # Persistent: "reopening" opens the same instance again.
    namespace = {"store_class": store_class, "persistent": True, "__qualname__": name}
    return type(name, (test_store_contract.TestMemoryStore,), namespace)


_STORE_CLASSES: list[type[MemoryStore]] = [MemoryStore, *MUTANTS, *RETENTION_MUTANTS]
for _store_class in _STORE_CLASSES:
    globals()[f"Test{_store_class.__name__}"] = _suite(_store_class)
