"""A running flow: open_flow, serve, and the Flow handle they give.

`open_flow` owns one nursery. In it run the dispatcher (group commit and
fan-out), the cursor writer, the lease keeper (which consumers, and which
partitions of its groups, this flow owns), a watcher for events appended
elsewhere, and one supervised task per consumer (per partition of a group).
Leaving the block stops them in order: no new publishes, pending publishes
committed, in-flight handlers given a grace period, every consumer's position
committed, leases released, then the tasks cancelled.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from functools import partial
from typing import Any, Literal, Unpack

import attrs
import trio

from ._app import App, BatchHandler, ConsumerOptions, ConsumerSpec, Handler, check_consumer_name
from ._consumer import Consumer, ConsumerRunner, handler_of
from ._cursors import CursorWriter
from ._dead_letters import DeadLetter
from ._dispatch import Dispatcher
from ._errors import (
    ConfigurationError,
    FlowClosedError,
    StoreError,
    UnknownConsumerError,
    UnknownDeadLetterError,
)
from ._events import ENCODE_CHUNK, JSON, NewEvent, check_items, encode, encode_many, new_ids
from ._groups import partition_key
from ._leases import new_holder_id
from ._ownership import LeaseKeeper
from ._retention import keep_pruning
from ._statistics import FlowStatistics, Readiness
from ._store_calls import SlowCalls, WatchedStore
from ._transactions import Transaction, append_published
from ._watchdog import consumer_task_name, flow_task_name, watch_blocking

logger = logging.getLogger("trioflow")

#: Seconds between looks at the stored cursors of consumers another flow owns,
#: while `Flow.wait_idle` waits for them.
STANDBY_CHECK = 0.2
#: Seconds for which a store call that returned shows that the store answers
#: (`Flow.readiness`), if no call failed since; after that it is asked again.
STORE_ANSWERED_RECENTLY = 10.0


class Flow:
    """A running flow: publish events, wait for consumers, inspect progress.

    Get one from `open_flow` or `serve`; don't construct it directly.
    """

    def __init__(self, app: App) -> None:
        self._app = app
        self._slow_calls = SlowCalls(store_threshold=app.store_wait_warning)
        store = WatchedStore(app.store, self._slow_calls)
        self._dispatcher = Dispatcher(
            store=store,
            page_size=app.page_size,
            page_bytes=app.page_bytes,
            max_batch=app.max_batch,
            retry_delay=app.restart.delay,
        )
        #: This flow's id as the holder of leases.
        self._holder = new_holder_id()
        self._leases = LeaseKeeper(
            store=store,
            holder=self._holder,
            ttl=app.lease_ttl,
            retry_delay=app.restart.delay,
        )
        self._cursors = CursorWriter(store=store, leases=self._leases)
        self._leases.on_change = self._cursors.nudge
        self._leases.hand_over = self._hand_over
        #: The cancel scope of each of the flow's tasks, by task.
        self._scopes: dict[object, trio.CancelScope] = {}
        self._runner = ConsumerRunner(
            store=store,
            dispatcher=self._dispatcher,
            cursors=self._cursors,
            leases=self._leases,
            page_size=app.page_size,
            page_bytes=app.page_bytes,
            commit_interval=app.commit_interval,
            restart_delay=app.restart.delay,
            slow_calls=self._slow_calls,
        )
        #: The flow's consumers by key: a plain consumer's name, or one
        #: partition of a group (``name/p``, added at start).
        self._consumers = {
            spec.name: self._runner.add(spec)
            for spec in app.consumers.values()
            if spec.partitions is None
        }
        #: Its consumer groups, by name.
        self._groups = {
            spec.name: spec for spec in app.consumers.values() if spec.partitions is not None
        }
        #: The flow's nursery, once started: consumers added later run in it.
        self._nursery: trio.Nursery | None = None
        self._store = store
        #: Who may publish: everyone; only the flow's own handlers (while it
        #: stops, until they return); nobody.
        self._accepting: Literal["all", "handlers", "none"] = "all"

    @property
    def app(self) -> App:
        """The App this flow runs."""
        return self._app

    async def publish(self, type: str, data: JSON = None, *, key: str | None = None) -> int:
        """Persist one event, then deliver it to every consumer.

        Returns once the event is committed to the store. Concurrent calls are
        committed together in one store transaction.

        Args:
            type: The event type, such as ``"order.created"``.
            data: Any JSON value: dicts with str keys, lists, str, int, finite
                float, bool, None.
            key: An optional key (a customer id, say).

        Returns:
            The event's sequence number.

        Raises:
            InvalidEventError: The type, key or data is invalid; nothing was
                persisted.
            FlowClosedError: The flow has stopped; nothing was persisted.
            StoreError: The store failed; the event was not persisted.
            OutcomeUnknownError: The store got the event but its answer was
                lost; it was persisted or not (see the message).

        If the call is cancelled after the event was handed to the store, the
        event may have been persisted (and is then delivered), as with any
        database write.
        """
        self._check_open()
        (event_id,) = new_ids(1)
        new = encode(type, data, key, event_id)
        (seq,) = await self._dispatcher.submit((new,))
        return seq

    async def publish_many(self, events: Iterable[Sequence[Any]]) -> list[int]:
        """Persist several events in one transaction (all or none), in order.

        Args:
            events: ``(type, data)`` or ``(type, data, key)`` items.

        Returns:
            Their sequence numbers, in the order given.

        Raises:
            InvalidEventError: An item is invalid; none was persisted.
            FlowClosedError: The flow has stopped; none was persisted.
            StoreError: The store failed; none was persisted.
            OutcomeUnknownError: The store got the batch but its answer was
                lost; all of it was persisted or none (see the message).
        """
        self._check_open()
        items = check_items(events)
        news: list[NewEvent] = []
        for first in range(0, len(items), ENCODE_CHUNK):
            if first:
                # Let other tasks run between chunks of a large batch.
                await trio.lowlevel.checkpoint()
                self._check_open()
            news += encode_many(items[first : first + ENCODE_CHUNK], first=first)
        if not news:
            await trio.lowlevel.checkpoint()
            return []
        return list(await self._dispatcher.submit(news))

    async def wait_idle(self) -> None:
        """Wait until every consumer of this flow has processed and committed all
        that the store held when this was called, including events other
        processes appended.

        A consumer another flow owns (`ConsumerStatistics.owned` is False)
        counts once its stored cursor is there, whichever flow moved it: this
        one looks at the store every `STANDBY_CHECK` seconds meanwhile (and,
        if the owner died, takes over once its lease lapses). Waits as long as
        a consumer keeps failing; wrap it in a timeout (`trio.fail_after`) if
        that matters.
        """
        target = await self._store.head()
        if target > self._dispatcher.head:
            self._dispatcher.request_poll()
        cursors = self._cursors
        stored: dict[str, int] | None = None
        with cursors.wanting_flush():
            while True:
                consumers = list(self._consumers.values())
                owned = [c for c in consumers if c.owned]
                behind = [c for c in owned if c.committed < target]
                standing_by = [
                    c
                    for c in consumers
                    if not c.owned and (stored is None or stored.get(c.name, -1) < target)
                ]
                if not behind and not standing_by and not any(c.requeues_pending for c in owned):
                    return
                # Idle consumers commit lazily; ask for their positions now
                # (consumers that go idle later see `flush_wanted`).
                for consumer in behind:
                    consumer.request_commit()
                if standing_by:
                    if stored is not None:
                        with trio.move_on_after(STANDBY_CHECK):
                            await cursors.wait_changed()
                    stored = await self._store.load_cursors()
                else:
                    await cursors.wait_changed()

    def statistics(self) -> FlowStatistics:
        """Return a snapshot of the flow and of every consumer."""
        dispatcher = self._dispatcher
        head = dispatcher.head
        return FlowStatistics(
            head=head,
            holder=self._holder,
            published=dispatcher.published,
            consumers={name: c.statistics(head) for name, c in self._consumers.items()},
            publish_latency=dispatcher.publish_latency,
            batch_size=dispatcher.batch_size,
            cursor_commit_latency=self._cursors.commit_latency,
            store_errors=self._store.errors,
        )

    async def readiness(self, *, store_timeout: float = 2.0) -> Readiness:
        """Whether the flow is ready to work, and if not, why: for readiness probes.

        Ready means all of:

        - the flow runs: it is not stopping;
        - its store answers: a store call returned within the last
          `STORE_ANSWERED_RECENTLY` seconds and none failed since, or else
          the store answers a ``head()`` asked now within ``store_timeout``;
        - every consumer is run by this flow (it holds its lease), or known to
          be run by another flow (this one stands by). A consumer whose lease
          this flow lost and whose next owner it has not yet seen is not, for
          up to a lease renewal.

        A halted consumer, or one retrying a failing event, leaves the flow
        ready: neither is helped by taking the process out of service; both
        show in `statistics` (and in the metrics, for alerts).

        Args:
            store_timeout: Seconds to wait for the store, when it is asked.
        """
        reasons: list[str] = []
        if self._accepting != "all":
            reasons.append("the flow is stopping")
        store = self._store
        if (
            store.last_error is not None
            or trio.current_time() - store.answered_at > STORE_ANSWERED_RECENTLY
        ):
            with trio.move_on_after(store_timeout) as probe:
                try:
                    await store.head()
                except StoreError as exc:
                    reasons.append(f"the store failed: {exc}")
            if probe.cancelled_caught:
                reasons.append(f"the store did not answer within {store_timeout:g}s")
        else:
            await trio.lowlevel.checkpoint()
        for name, consumer in self.statistics().consumers.items():
            if not consumer.owned and consumer.owner in (None, self._holder):
                reasons.append(
                    f"consumer {name!r} is neither run by this flow nor known to be run by "
                    "another (its lease lapsed, or its next owner is not yet known)"
                )
        return Readiness(ready=not reasons, reasons=tuple(reasons))

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """Run statements and publish events in one transaction of the store's database
        (the outbox): ``async with flow.transaction() as tx:``.

        The events published with ``tx.publish`` get their sequence numbers in
        the transaction, at its end (the store's ordering lock is taken then and
        held only until the commit), and reach consumers only once it commits:
        this flow's at once, other processes' as with any append. Leaving the
        block by an exception rolls everything back: no row, no event.

        Raises:
            ConfigurationError: The store cannot run transactions (memory).
            QueryError: The database refused a statement (after the rollback).
            FlowClosedError: The flow is closed.
        """
        self._check_open()
        async with self._store.transaction() as store_tx:
            tx = Transaction(store_tx, "this flow.transaction() block")
            try:
                yield tx
            finally:
                tx._close()
            seqs = await append_published(tx)
        if seqs:
            self._dispatcher.request_poll()

    async def dead_letters(self, consumer: str | None = None) -> list[DeadLetter]:
        """The dead letters in the store: of ``consumer``, or of every consumer.

        Includes those of consumers other processes run. Ordered by consumer,
        then sequence number.
        """
        if consumer is None:
            return await self._store.dead_letters()
        return await self._letters_of(check_consumer_name(consumer))

    async def _letters_of(self, consumer: str) -> list[DeadLetter]:
        """The dead letters of ``consumer``, and of its partitions if it is a group."""
        if consumer not in self._groups:
            letters = await self._store.dead_letters(consumer)
            if letters:
                return letters
        prefix = partition_key(consumer, 0).removesuffix("0")
        return [
            letter
            for letter in await self._store.dead_letters()
            if letter.consumer == consumer or letter.consumer.startswith(prefix)
        ]

    async def requeue(self, consumer: str, seqs: Iterable[int], *, after: float = 0.0) -> None:
        """Hand dead letters back to ``consumer``, to be handled again with its policy.

        The consumer handles them (in seq order, once it is level with the live
        stream, before its next live batch) and removes each one it handles;
        one that fails for good becomes a dead letter again. They come out of
        stream order by nature: a requeued event is handled after later ones.

        Args:
            consumer: The consumer's name. If this flow runs it, it is woken at
                once (or after ``after``); a consumer another process runs
                finds them at its next look (every few seconds).
            seqs: Sequence numbers of its dead letters.
            after: Hand them back only after this many seconds (an outage that
                needs time to clear).

        Raises:
            UnknownDeadLetterError: A seq is not a dead letter of ``consumer``;
                nothing was requeued.
        """
        if (
            isinstance(after, bool)
            or not isinstance(after, int | float)
            or not 0 <= after < math.inf
        ):
            raise ConfigurationError(
                f"after must be a finite number of seconds >= 0, got {after!r}"
            )
        wanted = await self._dead_letter_seqs(consumer, seqs, "requeue")
        for key, key_seqs in wanted.items():
            await self._store.requeue_dead_letters(key, key_seqs, after=after)
            running = self._consumers.get(key)
            if running is not None:
                running.requeued(after)

    async def discard(self, consumer: str, seqs: Iterable[int]) -> None:
        """Delete dead letters of ``consumer``: their events are not handled again by it.

        Raises:
            UnknownDeadLetterError: A seq is not a dead letter of ``consumer``;
                nothing was discarded.
        """
        wanted = await self._dead_letter_seqs(consumer, seqs, "discard")
        for key, key_seqs in wanted.items():
            await self._store.discard_dead_letters(key, key_seqs)

    async def resume(self, consumer: str) -> None:
        """Start a halted consumer again, from the event it halted at.

        Raises:
            UnknownConsumerError: This flow runs no consumer of that name.
            ConsumerStateError: It is not halted.
        """
        members = self._members(consumer)
        halted = [member for member in members if member.halted]
        if len(members) == 1 or not halted:
            members[0].resume()
        for member in halted:
            member.resume()
        await trio.lowlevel.checkpoint()

    async def add_consumer(
        self,
        name: str,
        handler: Handler | BatchHandler,
        *,
        batch: int | None = None,
        max_wait: float | None = None,
        **options: Unpack[ConsumerOptions],
    ) -> None:
        """Start a consumer in this running flow, as ``@app.consumer(name, **options)`` would.

        It takes the same options (``batch`` and ``max_wait`` too, for a
        batch consumer), with the same checks, and recovers like any
        other: from its stored cursor, or from ``start``. Returns once it has
        loaded its cursor. It runs until the flow stops or `remove_consumer`.

        Raises:
            ConfigurationError: The name is taken in this flow, or the handler
                or an option is invalid.
        """
        self._check_open()
        spec = self._app.make_spec(handler, name, batch=batch, max_wait=max_wait, **options)
        if spec.name in self._consumers or spec.name in self._groups:
            raise ConfigurationError(
                f"this flow already runs a consumer named {spec.name!r}; remove it first "
                "or choose another name"
            )
        nursery = self._nursery
        assert nursery is not None, "the flow is running"
        added = await self._expand(spec)
        try:
            for consumer in added:
                await nursery.start(
                    self._guarded,
                    consumer,
                    consumer.run,
                    True,
                    name=consumer_task_name(consumer.name),
                )
        except BaseException:
            for consumer in added:
                scope = self._scopes.pop(consumer, None)
                if scope is not None:
                    scope.cancel()
                del self._consumers[consumer.name]
                self._runner.remove(consumer)
            if self._groups.pop(spec.name, None) is not None:
                with trio.CancelScope(shield=True):
                    await self._leases.leave(spec.name)
            raise
        await self._start_watcher()

    async def _expand(self, spec: ConsumerSpec) -> list[Consumer]:
        """Add the consumer of ``spec``, or the partitions of a group (joining it)."""
        if spec.partitions is None:
            consumer = self._consumers[spec.name] = self._runner.add(spec)
            return [consumer]
        failures = 0
        while True:
            try:
                await self._leases.join(spec.name, spec.partitions)
                break
            except StoreError as exc:
                # As any start-up failure: retried, and cancellable meanwhile.
                failures += 1
                delay = self._app.restart.delay(failures)
                logger.warning(
                    "joining consumer group %r failed (%s); retrying in %.1fs",
                    spec.name,
                    exc,
                    delay,
                )
                await trio.sleep(delay)
        self._groups[spec.name] = spec
        added = []
        for partition in range(spec.partitions):
            part = spec.partition_spec(partition)
            consumer = self._consumers[part.name] = self._runner.add(part)
            added.append(consumer)
        return added

    async def remove_consumer(self, name: str, *, forget: bool = False) -> None:
        """Stop a consumer of this flow gracefully and let it go.

        Its handler in flight gets ``shutdown_grace`` seconds to return, and
        its position is committed, as when the flow stops. With ``forget``
        its cursor and dead letters are deleted too: a consumer of that name
        added later starts afresh.

        Raises:
            UnknownConsumerError: This flow runs no consumer of that name.
        """
        members = self._members(name)
        grace = self._app.shutdown_grace
        for consumer in members:
            consumer.stop(trio.current_time() + grace)
            scope = self._scopes.pop(consumer, None)
            if scope is not None:
                scope.cancel()
        with trio.CancelScope(shield=True):
            with trio.move_on_after(grace + 1):
                for consumer in members:
                    await consumer.wait_finished()
            for consumer in members:
                del self._consumers[consumer.name]
                self._runner.remove(consumer)
            try:
                with trio.move_on_after(grace):
                    await self._cursors.flush([c.final_position() for c in members])
            finally:
                with trio.move_on_after(grace):
                    if self._groups.pop(name, None) is not None:
                        await self._leases.leave(name, forget=forget)
                    else:
                        await self._leases.release([name])
            if forget:
                for consumer in members:
                    await self._store.forget_consumer(consumer.name)

    async def _hand_over(self, keys: Sequence[str]) -> None:
        """Commit the positions of partitions this flow hands over, before their
        leases go: the next owner starts where these stopped."""
        # Let their cancelled handlers unwind first.
        await trio.lowlevel.checkpoint()
        positions = [
            self._consumers[key].final_position() for key in keys if key in self._consumers
        ]
        with trio.move_on_after(self._app.shutdown_grace):
            try:
                await self._cursors.flush(positions)
            except StoreError as exc:
                logger.warning(
                    "could not commit the positions of the partitions this flow hands over "
                    "(%s); their next owners start from their last committed cursors",
                    exc,
                )

    def _members(self, name: str) -> list[Consumer]:
        """The consumer ``name``, or the partitions of group ``name``."""
        group = self._groups.get(name)
        if group is not None and group.partitions is not None:
            return [self._consumers[partition_key(name, p)] for p in range(group.partitions)]
        consumer = self._consumers.get(name)
        if consumer is None:
            names = [n for n in self._consumers if "/" not in n] + list(self._groups)
            raise UnknownConsumerError(
                f"this flow runs no consumer named {name!r}; it runs "
                f"{', '.join(map(repr, names)) or 'none'}"
            )
        return [consumer]

    async def _dead_letter_seqs(
        self, consumer: str, seqs: Iterable[int], what: str
    ) -> dict[str, list[int]]:
        """The given seqs of ``consumer``'s dead letters, by the key they are kept under
        (a group's partition)."""
        check_consumer_name(consumer)
        given = None if isinstance(seqs, str | bytes) else _list_or_none(seqs)
        ints = [seq for seq in given or () if type(seq) is int]
        if not given or len(ints) != len(given):
            raise ConfigurationError(f"seqs must be one or more int sequence numbers, got {seqs!r}")
        wanted = sorted(set(ints))
        held = {letter.seq: letter.consumer for letter in await self._letters_of(consumer)}
        missing = [seq for seq in wanted if seq not in held]
        if missing:
            raise UnknownDeadLetterError(
                f"consumer {consumer!r} has no dead letter at seq {', '.join(map(str, missing))}; "
                f"nothing was {what}d; list them with `await flow.dead_letters({consumer!r})`"
            )
        by_key: dict[str, list[int]] = {}
        for seq in wanted:
            by_key.setdefault(held[seq], []).append(seq)
        return by_key

    def _check_open(self) -> None:
        accepting = self._accepting
        if accepting == "all" or (accepting == "handlers" and handler_of.get() is self._runner):
            return
        raise FlowClosedError(
            "the flow is closed; publish inside `async with trioflow.open_flow(app)`"
        )

    async def _start(self, nursery: trio.Nursery) -> None:
        # Named so that the blocking watchdog can say whose step held the loop.
        tasks: list[tuple[object, Callable[..., Awaitable[None]], bool, str]] = []
        tasks.append(("slow calls", self._slow_calls.run, False, "slow calls"))
        tasks.append(("dispatcher", self._dispatcher.run, True, "dispatcher"))
        tasks.append(("cursors", self._cursors.run, False, "cursor writer"))
        # Before the consumers: each one starts knowing whether this flow owns it.
        tasks.append(("leases", self._leases.run, True, "lease keeper"))
        tasks.append(("members", self._leases.forget_departed, False, "departed members"))
        for spec in list(self._groups.values()):
            await self._expand(spec)
        for key, run, reports_started, name in tasks:
            await nursery.start(self._guarded, key, run, reports_started, name=flow_task_name(name))
        self._nursery = nursery
        for consumer in list(self._consumers.values()):
            await nursery.start(
                self._guarded, consumer, consumer.run, True, name=consumer_task_name(consumer.name)
            )
        self._runner.all_started()
        if self._consumers:
            await self._start_watcher()
        retention = self._app.retention
        if retention is not None:
            # After the consumers: each has stored its cursor by now, so none
            # of this flow's can lose an event its replay needs.
            await nursery.start(
                self._guarded,
                "retention",
                partial(keep_pruning, self._store, retention),
                False,
                name=flow_task_name("retention"),
            )

    async def _start_watcher(self) -> None:
        """Start the watcher of other processes' events, once: consumers need it."""
        if "watcher" not in self._scopes:
            assert self._nursery is not None
            await self._nursery.start(
                self._guarded, "watcher", self._watch, False, name=flow_task_name("watcher")
            )

    async def _guarded(
        self,
        key: object,
        run: Callable[..., Awaitable[None]],
        reports_started: bool,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run one of the flow's tasks, shielded from outside cancellation once started.

        A cancellation from outside reaches the body of `open_flow`, whose
        exit then stops the tasks in order (`_stop`): the cursor writer must
        outlive the consumers, the dispatcher must commit what is pending.
        Until a task has started it is not shielded, so that a start-up
        waiting on a failing store can be cancelled from outside.
        """
        with trio.CancelScope() as scope:
            self._scopes[key] = scope
            status = _ShieldOnStart(scope, task_status)
            if reports_started:
                await run(task_status=status)
            else:
                status.started()
                await run()

    async def _watch(self) -> None:
        """Learn of events appended by other processes or flows on the store."""
        store, dispatcher = self._store, self._dispatcher
        failures = 0
        while True:
            try:
                head = await store.wait_for_append(dispatcher.head)
                # The flow's own appends wake the store's waiters too; by now
                # the dispatcher has usually fanned them out. Ask it to read
                # the store only for events it has not seen, so it is not
                # held up by empty reads between group commits.
                behind = head > dispatcher.head
            except StoreError as exc:
                failures += 1
                delay = self._app.restart.delay(failures)
                logger.warning("watching the store failed (%s); retrying in %.1fs", exc, delay)
                await trio.sleep(delay)
                continue
            if behind:
                # Up to the head the store named, not to the end of the log:
                # no read that finds nothing after the new events. Events
                # committed since wake the store's waiters again.
                dispatcher.request_poll(head)
                if not await dispatcher.wait_polled():
                    # The read failed (the dispatcher logged it): back off
                    # instead of polling again at once.
                    failures += 1
                    await trio.sleep(self._app.restart.delay(failures))
                    continue
            failures = 0

    async def _stop(self) -> None:
        """Stop in order; whatever happens on the way, every task ends."""
        try:
            await self._stop_in_order()
        finally:
            for scope in self._scopes.values():
                scope.cancel()

    async def _stop_in_order(self) -> None:
        grace = self._app.shutdown_grace
        for key in ("retention", "members"):
            # Nothing to finish: a prune cut short is rolled back whole, and
            # memberships not forgotten now are forgotten another time.
            scope = self._scopes.pop(key, None)
            if scope is not None:
                scope.cancel()
        # Handlers may still publish (the next step of a chain, say) until
        # they return; nobody else may.
        self._accepting = "handlers"
        # Consumers stop taking events: publishers no longer wait for room.
        self._dispatcher.stop_blocking()
        await self._drain(grace)
        self._runner.stop(trio.current_time() + grace)
        started = []
        for consumer in self._consumers.values():
            scope = self._scopes.pop(consumer, None)
            if scope is not None:
                scope.cancel()
                started.append(consumer)
        with trio.move_on_after(grace + 1):
            for consumer in started:
                await consumer.wait_finished()
        self._accepting = "none"
        await self._drain(grace)
        with trio.move_on_after(grace) as flush:
            try:
                await self._cursors.flush(c.final_position() for c in self._consumers.values())
            except StoreError as exc:
                logger.warning(
                    "could not flush consumer cursors (%s); they resume from their last "
                    "committed cursors",
                    exc,
                )
        if flush.cancelled_caught:
            logger.warning("could not flush consumer cursors within %.1fs", grace)
        # Hand the consumers over to flows standing by at once.
        with trio.move_on_after(grace):
            await self._leases.release([n for n in self._consumers if "/" not in n])
            for group in list(self._groups):
                await self._leases.leave(group)

    async def _drain(self, grace: float) -> None:
        with trio.move_on_after(grace) as drain:
            await self._dispatcher.wait_drained()
        if drain.cancelled_caught:
            logger.warning("publishes still pending after %.1fs; abandoning them", grace)


@attrs.define(eq=False)
class _ShieldOnStart:
    """Passes "started" on to ``nursery.start``, shielding the task from then on.

    Only once the task has moved into the flow's nursery: if the caller of
    ``nursery.start`` is being cancelled, trio leaves the task where it is to
    be cancelled with it, and a shield would keep it (and the caller) forever.
    """

    scope: trio.CancelScope
    status: trio.TaskStatus[None]

    def started(self, value: None = None) -> None:
        task = trio.lowlevel.current_task()
        before = task.parent_nursery
        self.status.started()
        # No checkpoint since started(): nothing can have cancelled it yet.
        if task.parent_nursery is not before:
            self.scope.shield = True


@contextlib.asynccontextmanager
async def open_flow(app: App) -> AsyncIterator[Flow]:
    """Open the store, recover every consumer, and run the flow inside the block.

    On entry the store is opened (schema created or checked) and every
    consumer has loaded its durable cursor; consumers then replay what they
    missed and follow the live stream. Leaving the block (normally, by an
    exception or by cancellation) stops gracefully: pending publishes are
    committed, in-flight handlers get ``app.shutdown_grace`` seconds to
    finish, and every consumer's position is committed.

    Raises:
        StoreUnavailableError: The store cannot be opened.
        SchemaVersionError: The store was written by a newer trioflow.
        ConfigurationError: This App already runs a flow.
        PrunedLogError: A consumer's stored cursor is behind the pruned log
            (the message names it and says how to fix it).
    """
    if not isinstance(app, App):
        raise ConfigurationError(f"open_flow needs a trioflow.App, got {app!r}")
    if getattr(app, "_running", False):
        raise ConfigurationError("this App already runs a flow; stop it before opening another")
    app._running = True  # type: ignore[attr-defined]
    try:
        with watch_blocking(app.blocking_warning):
            async with app.store.open(), trio.open_nursery() as nursery:
                flow = Flow(app)
                try:
                    await flow._start(nursery)
                    yield flow
                finally:
                    with trio.CancelScope(shield=True):
                        await flow._stop()
                    nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The flow's own tasks handle their errors, so a lone exception here
        # came from the body of the block: give it back unwrapped.
        if len(group.exceptions) == 1:
            exc = group.exceptions[0]
            raise exc from exc.__cause__
        raise
    finally:
        app._running = False  # type: ignore[attr-defined]


async def serve(app: App, *, task_status: trio.TaskStatus[Flow] = trio.TASK_STATUS_IGNORED) -> None:
    """Run ``app``'s flow until cancelled; for long-running services.

    ``await trioflow.serve(app)`` runs forever; ``flow = await
    nursery.start(trioflow.serve, app)`` hands back the running `Flow` (to
    publish with) once every consumer has recovered. Cancelling it stops
    gracefully, as leaving `open_flow` does.
    """
    async with open_flow(app) as flow:
        task_status.started(flow)
        await trio.sleep_forever()


def _list_or_none(items: object) -> list[object] | None:
    return list(items) if isinstance(items, Iterable) else None
