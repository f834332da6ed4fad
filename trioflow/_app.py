"""The App: where the store is chosen and consumers are registered."""

from __future__ import annotations

import collections.abc
import datetime
import inspect
import math
import re
import typing
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Literal, TypedDict, TypeVar, Unpack, overload

import attrs

from ._errors import ConfigurationError, InvalidEventError
from ._events import Event, check_type
from ._groups import partition_key
from ._policies import (
    OVERFLOWS,
    DeliveryPolicy,
    OnExhausted,
    Overflow,
    RestartPolicy,
    Retry,
    delivery_policy,
)
from ._retention import Retention
from ._transactions import Transaction
from .stores._base import Store
from .stores._url import default_store_url, store_from_url

#: A consumer's handler: an async function taking one Event (and, for a
#: transactional consumer, its Transaction).
Handler = Callable[[Event], Awaitable[object]] | Callable[[Event, Transaction], Awaitable[object]]
H = TypeVar("H", bound=Handler)
#: A batch consumer's handler (``batch=``): an async function taking a
#: sequence of Events, in order (and, for a transactional consumer, their
#: Transaction).
BatchHandler = (
    Callable[[Sequence[Event]], Awaitable[object]]
    | Callable[[Sequence[Event], Transaction], Awaitable[object]]
)
B = TypeVar("B", bound=BatchHandler)

#: Where a consumer with no stored cursor begins.
StartFrom = Literal["earliest", "latest"]

#: A bounded consumer's default `buffer_bytes`.
DEFAULT_BUFFER_BYTES = 64 * 1024 * 1024

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


class ConsumerOptions(TypedDict, total=False):
    """The options of `App.consumer` (and `Flow.add_consumer`), for type checkers."""

    types: Iterable[str] | None
    start: StartFrom
    buffer: int | None
    buffer_bytes: int | None
    overflow: Overflow
    commit_every: int | None
    retry: Retry | None
    retry_on: type[Exception] | tuple[type[Exception], ...] | None
    timeout: float | None
    on_exhausted: OnExhausted
    partitions: int | None
    transactional: bool


@attrs.frozen(kw_only=True)
class ConsumerSpec:
    """A registered consumer, as `App.consumer` recorded it.

    Attributes:
        name: The durable name its cursor is stored under.
        handler: The async function called once per event, in order (once
            per batch of events for a batch consumer).
        types: The event types it receives, or None for all.
        start: Where it begins when the store holds no cursor for it yet.
        buffer: The most events held for it in memory, or None (unbounded).
        buffer_bytes: The most event data (bytes) held for it in memory, or
            None (unbounded).
        overflow: What happens when it would hold more than ``buffer``.
        commit_every: Commit its cursor at least every this many handled events.
        policy: What it does when its handler fails: retries, timeout, and
            what happens once an event's attempts run out.
        partitions: For a consumer group, how many partitions its events are
            divided into by key (`trioflow._groups.partition_of`); None for a
            plain consumer.
        partition: For one partition of a group, as a flow runs it: which one.
        transactional: Whether its handler runs in a store transaction that
            also moves its cursor (exactly-once effects), taking ``(event, tx)``.
        batch: For a batch consumer, the most events its handler takes per
            call (a sequence of them); None for a consumer of single events.
        max_wait: For a batch consumer, how long (seconds) to wait for more
            events to fill a batch once one is available; None: never wait.
    """

    name: str
    handler: Handler | BatchHandler
    types: frozenset[str] | None
    start: StartFrom
    buffer: int | None
    buffer_bytes: int | None
    overflow: Overflow
    commit_every: int
    policy: DeliveryPolicy
    partitions: int | None = None
    partition: int | None = None
    transactional: bool = False
    batch: int | None = None
    max_wait: float | None = None

    def partition_spec(self, partition: int) -> ConsumerSpec:
        """The spec of one partition of this group: its own cursor and lease key."""
        assert self.partitions is not None and 0 <= partition < self.partitions
        return attrs.evolve(self, name=partition_key(self.name, partition), partition=partition)


#: The most partitions a consumer group may have.
MAX_PARTITIONS = 1024


def check_consumer_name(name: object) -> str:
    """Return ``name`` if it is a valid consumer name, else raise ConfigurationError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigurationError(
            f"invalid consumer name {name!r}: use 1 to 128 letters, digits, '_', '.', ':' "
            "or '-', starting with a letter or digit"
        )
    return name


def _positive_int(what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{what} must be an int >= 1, got {value!r}")
    return value


def _positive_float(what: str, value: object, *, hint: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ConfigurationError(f"{what} must be a finite number > 0{hint}, got {value!r}")
    return float(value)


class App:
    """A trioflow application: one store and the consumers that read it.

    Args:
        store: A store URL (``"sqlite:///events.db"``, ``"memory://"``,
            ``"postgresql://user@host/db"``) or a `Store` instance. Default:
            the ``TRIOFLOW_STORE`` environment variable, else
            ``sqlite:///trioflow.db``.
        commit_every: Default for consumers: commit the cursor at least every
            this many handled events. After a crash a consumer handles at most
            this many events a second time. 1 commits after every event.
        commit_interval: Commit a consumer's cursor at least this often (seconds)
            while it has handled events past its committed cursor, busy or
            idle. `Flow.wait_idle` makes idle consumers commit at once.
        poll_interval: Seconds between checks for events appended by other
            processes, overriding the store's own default.
        page_size: The most events read from the store per query when
            replaying. Each replay starts with a page of 32 and doubles it up
            to this, so a consumer that fails again soon after a restart does
            not read a full page for nothing.
        page_bytes: The most event data (`Event.size`, bytes) read from the
            store per query: a page ends before the event that would pass it
            (a page holds at least one event, whatever its size). Replays of
            large events hold about two pages of them in memory.
        max_batch: The most events committed by one store transaction when
            concurrent ``publish`` calls are grouped (and at most 16 MiB of
            event data, unless one ``publish_many`` alone is larger).
        shutdown_grace: Seconds in-flight handlers get to finish when the flow
            stops, and again for the final cursor flush.
        restart: How long a consumer waits before it restarts after a store
            error (handler failures are retried in place, by ``retry``).
        retry: Default for consumers: how an event their handler failed on is
            retried, in place (`Retry`).
        store_wait_warning: Log a warning, naming the call, when a store call
            has waited this many seconds (and again at doubling intervals
            while it waits): a lock held by a long transaction, a busy disk or
            a network that stopped answering then shows in the log instead of
            as a silent stall. None: never.
        blocking_warning: Log a WARNING (logger ``trioflow``) naming the
            consumer, or other task, when one step of a task holds the event
            loop longer than this many seconds: a handler that makes a
            blocking call (``time.sleep``, a synchronous client) stalls every
            consumer and publisher meanwhile. At most one warning per
            consumer or task a minute, counting the steps left out. None:
            don't watch. Default 0.1, asyncio's threshold for slow callbacks
            in debug mode: steps of non-blocking code take microseconds
            (trioflow's own, on batches of 1,000 events, a few milliseconds),
            and a blocking call that long delays every event meanwhile.
        lease_ttl: Seconds a flow's lease on a consumer lasts without renewal.
            Every flow that runs a consumer name competes for its lease: the
            holder handles events, the others stand by. The holder renews
            every ``lease_ttl / 3`` seconds and stops handling if it could
            not renew within ``lease_ttl``; a standby takes over within
            about ``lease_ttl * 4 / 3`` of the holder's death (8 s by
            default), at once after a graceful stop. Shorter: faster
            failover, more store calls (one per flow every ``lease_ttl / 3``
            seconds, for all its consumers).
        retention: Delete old events that every consumer has passed: a
            `Retention`, or just the maximum age (a `datetime.timedelta`, or
            seconds). None (default): keep every event. See `Retention`.

    Raises:
        ConfigurationError: An option is invalid.
        UnknownStoreError: The store URL is not one trioflow can open.
    """

    def __init__(
        self,
        store: str | Store | None = None,
        *,
        commit_every: int = 100,
        commit_interval: float = 1.0,
        poll_interval: float | None = None,
        page_size: int = 1000,
        page_bytes: int = 8 * 1024 * 1024,
        max_batch: int = 10_000,
        shutdown_grace: float = 10.0,
        restart: RestartPolicy | None = None,
        retry: Retry | None = None,
        store_wait_warning: float | None = 5.0,
        blocking_warning: float | None = 0.1,
        lease_ttl: float = 6.0,
        retention: Retention | datetime.timedelta | float | None = None,
    ) -> None:
        self._poll_interval = (
            None if poll_interval is None else _positive_float("poll_interval", poll_interval)
        )
        self._consumers: dict[str, ConsumerSpec] = {}
        self.store: Store = self._build_store(default_store_url() if store is None else store)
        self.commit_every = _positive_int("commit_every", commit_every)
        self.commit_interval = _positive_float("commit_interval", commit_interval)
        self.page_size = _positive_int("page_size", page_size)
        self.page_bytes = _positive_int("page_bytes", page_bytes)
        self.max_batch = _positive_int("max_batch", max_batch)
        self.shutdown_grace = _positive_float("shutdown_grace", shutdown_grace)
        self.restart = RestartPolicy() if restart is None else restart
        self.lease_ttl = _positive_float("lease_ttl", lease_ttl)
        self.retry = Retry() if retry is None else retry
        if not isinstance(self.retry, Retry):
            raise ConfigurationError(f"retry must be a trioflow.Retry, got {retry!r}")
        if not isinstance(self.restart, RestartPolicy):
            raise ConfigurationError(f"restart must be a RestartPolicy, got {restart!r}")
        self.store_wait_warning = (
            None
            if store_wait_warning is None
            else _positive_float(
                "store_wait_warning", store_wait_warning, hint=" (or None to turn it off)"
            )
        )
        if blocking_warning is not None:
            hint = " (or None to turn the warning off)"
            blocking_warning = _positive_float("blocking_warning", blocking_warning, hint=hint)
        self.blocking_warning = blocking_warning
        self.retention = None if retention is None else Retention.of(retention)

    def use_store(self, store: str | Store) -> None:
        """Point this App at another store, before it runs (``trioflow run --store``).

        The App's own options (``poll_interval``) apply to the new store as
        they did to the one it was built with.

        Args:
            store: A store URL or a `Store` instance, as for the constructor.

        Raises:
            ConfigurationError: The App runs a flow now, or it has a
                transactional consumer and the new store cannot run
                transactions.
            UnknownStoreError: The store URL is not one trioflow can open.
        """
        if getattr(self, "_running", False):
            raise ConfigurationError(
                "this App runs a flow; stop it before pointing it at another store"
            )
        self.store = self._build_store(store)

    def _build_store(self, store: str | Store) -> Store:
        """The store ``store`` names, with this App's options, checked against its consumers."""
        built = store if isinstance(store, Store) else store_from_url(store)
        transactional = [spec.name for spec in self._consumers.values() if spec.transactional]
        if transactional and not built.supports_transactions:
            raise ConfigurationError(
                f"consumers {', '.join(map(repr, transactional))} are transactional, but the "
                f"{type(built).__name__} cannot run transactions: use the SQLite or "
                "PostgreSQL store"
            )
        if self._poll_interval is not None:
            built.poll_interval = self._poll_interval
        return built

    @property
    def consumers(self) -> Mapping[str, ConsumerSpec]:
        """The registered consumers, by name, in registration order."""
        return dict(self._consumers)

    @overload
    def consumer(self, name: H, /) -> H: ...

    @overload
    def consumer(
        self,
        name: str | None = None,
        /,
        *,
        batch: int,
        max_wait: float | None = None,
        **options: Unpack[ConsumerOptions],
    ) -> Callable[[B], B]: ...

    @overload
    def consumer(
        self, name: str | None = None, /, **options: Unpack[ConsumerOptions]
    ) -> Callable[[H], H]: ...

    def consumer(
        self,
        name: str | H | None = None,
        /,
        *,
        batch: int | None = None,
        max_wait: float | None = None,
        **options: Unpack[ConsumerOptions],
    ) -> H | Callable[[H], H] | Callable[[B], B]:
        """Register an async function as a durable consumer.

        Use as ``@app.consumer("audit")``, with options, or bare as
        ``@app.consumer`` (the function's name becomes the consumer's name).

        Args:
            name: The durable consumer name its cursor is stored under: 1 to 128
                characters of letters, digits and ``_ . : -``, starting with a
                letter or digit. Renaming a consumer starts it afresh.
            types: Deliver only events of these types; the cursor still moves
                past the others.
            start: Where a consumer with no stored cursor begins: ``"earliest"``
                (replay the whole log, from the oldest event retention kept)
                or ``"latest"`` (only events published after the flow
                started). Its first cursor is stored at once.
            buffer: Hold at most this many events in memory for this consumer.
                None (default): unbounded.
            buffer_bytes: Hold at most this much event data (`Event.size`, in
                bytes) in memory for this consumer, as ``buffer`` does for a
                count. Default: 64 MiB when ``buffer`` is set, else unbounded.
            overflow: What happens when a bounded consumer would hold more:
                ``"catch-up"`` (default): it is fed no more and later reads
                what it missed from the store; ``"block"``: this flow's
                publishers wait until it has room (backpressure; needs
                ``buffer``).
            commit_every: Override the App's ``commit_every`` for this consumer.
            retry: How a failed event is retried, in place (default: the App's
                ``retry``).
            retry_on: Retry only these errors (an Exception class or a tuple of
                them); others give up at once (``on_exhausted``). Needs
                ``on_exhausted`` ``"dead-letter"`` or ``"halt"``.
            timeout: Seconds each handler call may take; it is then cancelled
                and the attempt counts as failed. None (default): no limit.
            on_exhausted: When an event's attempts run out (or its handler
                raises `Reject`): ``"retry-forever"`` (default: never skip,
                keep retrying with the capped backoff), ``"dead-letter"``
                (record it as a dead letter, move on) or ``"halt"`` (stop at
                it until `Flow.resume`).
            partitions: Make it a consumer group of this many partitions (1 to
                1024): events are divided by key (a stable hash; events
                without a key by sequence number), each partition has its own
                cursor and owner, and the flows running the consumer share
                the partitions, running their own concurrently. Order holds
                per key, not across keys. The count is fixed when the group
                first runs (see docs/deploying.md).
            transactional: Run the handler in a transaction of the store's
                database, ``async def handler(event, tx)``: its statements
                (``tx.execute(...)``) and the consumer's cursor move commit
                together, so each event's effect is applied exactly once, even
                across crashes. ``commit_every`` (default 1 here) events share
                one transaction. Needs the SQLite or PostgreSQL store (see
                docs/transactions.md). With ``batch``: one transaction per
                batch, ``async def handler(events, tx)``.
            batch: Make it a batch consumer: its handler takes a sequence of
                up to this many events, in order (``async def
                handler(events)``), handed over as soon as they are available
                (all that are, up to ``batch``; during a replay, at most a
                page). Its cursor moves once the handler returns; a handler
                that did part of a batch says how far it got by raising
                `BatchError`. ``commit_every`` then counts batches (default
                1). See the README's "Batch consumers".
            max_wait: For a batch consumer: once events are available, wait up
                to this many seconds for more, to fill the batch. None
                (default): hand over what is available at once.

        Returns:
            The function itself, unchanged.

        Raises:
            ConfigurationError: The name is invalid or taken, the function is
                not async or cannot take an event, or an option is invalid.
        """
        if callable(name):
            if options or batch is not None or max_wait is not None:
                raise ConfigurationError(
                    "give options with the consumer's name: @app.consumer('name', ...)"
                )
            self._register(self.make_spec(name))
            return name

        if batch is not None or max_wait is not None:

            def decorate_batch(handler: B) -> B:
                spec = self.make_spec(handler, name, batch=batch, max_wait=max_wait, **options)
                self._register(spec)
                return handler

            return decorate_batch

        def decorate(handler: H) -> H:
            self._register(self.make_spec(handler, name, **options))
            return handler

        return decorate

    def make_spec(
        self,
        handler: Handler | BatchHandler,
        name: str | None = None,
        *,
        types: Iterable[str] | None = None,
        start: StartFrom = "earliest",
        buffer: int | None = None,
        buffer_bytes: int | None = None,
        overflow: Overflow = "catch-up",
        commit_every: int | None = None,
        retry: Retry | None = None,
        retry_on: type[Exception] | tuple[type[Exception], ...] | None = None,
        timeout: float | None = None,
        on_exhausted: OnExhausted = "retry-forever",
        partitions: int | None = None,
        transactional: bool = False,
        batch: int | None = None,
        max_wait: float | None = None,
    ) -> ConsumerSpec:
        """Check a consumer's handler and options, with this App's defaults, and
        return its `ConsumerSpec` without registering it (`Flow.add_consumer`
        does so for a running flow). The options are `consumer`'s.

        Raises:
            ConfigurationError: The name, handler or an option is invalid.
        """
        if not _is_async_callable(handler):
            raise ConfigurationError(
                f"consumer handler {handler!r} is not an async function; define it with "
                "`async def handler(event): ...`"
            )
        if not isinstance(transactional, bool):
            raise ConfigurationError(f"transactional must be True or False, got {transactional!r}")
        if batch is not None:
            _positive_int("batch", batch)
        if max_wait is not None:
            if batch is None:
                raise ConfigurationError(
                    "max_wait is how long a batch consumer waits to fill a batch: give it "
                    "batch= too (batch=1000, say), or drop max_wait"
                )
            max_wait = _positive_float("max_wait", max_wait, hint=" (or None: never wait)")
        if batch is not None and transactional and commit_every is not None:
            raise ConfigurationError(
                "a transactional batch consumer commits its cursor in each batch's "
                "transaction, so commit_every does not apply: drop it (batch= sets the "
                "events per transaction)"
            )
        _check_takes_one_event(handler, transactional=transactional, batch=batch is not None)
        if transactional and not self.store.supports_transactions:
            raise ConfigurationError(
                f"consumer {name!r} is transactional, but the {type(self.store).__name__} "
                "cannot run transactions (nothing it holds is durable): use the SQLite or "
                "PostgreSQL store"
            )
        if name is None:
            name = getattr(handler, "__name__", None)
        name = check_consumer_name(name)
        if isinstance(types, str):
            raise ConfigurationError(
                f"types must be a collection of event types, not the str {types!r}; "
                f"write types={{{types!r}}}"
            )
        try:
            type_set = None if types is None else frozenset(check_type(t) for t in types)
        except InvalidEventError as exc:
            raise ConfigurationError(f"consumer {name!r} types: {exc}") from None
        if start not in ("earliest", "latest"):
            raise ConfigurationError(f"start must be 'earliest' or 'latest', got {start!r}")
        if buffer is not None:
            _positive_int("buffer", buffer)
        if buffer_bytes is not None:
            _positive_int("buffer_bytes", buffer_bytes)
        elif buffer is not None:
            buffer_bytes = DEFAULT_BUFFER_BYTES
        if overflow not in OVERFLOWS:
            raise ConfigurationError(
                f"overflow must be one of {', '.join(map(repr, OVERFLOWS))}, got {overflow!r}"
            )
        if overflow == "block" and buffer is None:
            raise ConfigurationError(
                "overflow='block' makes publishers wait while this consumer holds `buffer` "
                "events: give it a buffer (buffer=1000, say)"
            )
        if partitions is not None and (
            isinstance(partitions, bool)
            or not isinstance(partitions, int)
            or not 1 <= partitions <= MAX_PARTITIONS
        ):
            raise ConfigurationError(
                f"partitions must be an int from 1 to {MAX_PARTITIONS}, got {partitions!r}"
            )
        return ConsumerSpec(
            name=name,
            handler=handler,
            partitions=partitions,
            types=type_set,
            start=start,
            buffer=buffer,
            buffer_bytes=buffer_bytes,
            overflow=overflow,
            # A transactional consumer's cursor moves in each handler's
            # transaction: one event per transaction unless asked for more.
            # A batch consumer's counts batches: after each, by default.
            commit_every=(1 if transactional or batch is not None else self.commit_every)
            if commit_every is None
            else _positive_int("commit_every", commit_every),
            transactional=transactional,
            batch=batch,
            max_wait=max_wait,
            policy=delivery_policy(
                retry=self.retry if retry is None else retry,
                retry_on=retry_on,
                timeout=timeout,
                on_exhausted=on_exhausted,
            ),
        )

    def _register(self, spec: ConsumerSpec) -> None:
        if spec.name in self._consumers:
            raise ConfigurationError(
                f"a consumer named {spec.name!r} is already registered on this App; "
                "consumer names must be unique"
            )
        self._consumers[spec.name] = spec


def _is_async_callable(obj: object) -> bool:
    while hasattr(obj, "func") and not inspect.isfunction(obj):  # functools.partial
        obj = obj.func
    return inspect.iscoroutinefunction(obj) or inspect.iscoroutinefunction(
        getattr(obj, "__call__", None)  # noqa: B004 - an instance with an async __call__
    )


def _check_takes_one_event(
    handler: Callable[..., object], *, transactional: bool = False, batch: bool = False
) -> None:
    """Refuse a handler that cannot be called with the event (a batch
    consumer's: the sequence of events; and, for a transactional consumer, its
    transaction) as positional arguments, or whose annotation says it takes
    the other kind: one event where a batch comes, or the reverse."""
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):
        return  # Some callables (builtins, C extensions) have no signature to check.
    what, call = (
        ("the sequence of events", "async def handler(events")
        if batch
        else ("the event", "async def handler(event")
    )
    try:
        signature.bind(None, None) if transactional else signature.bind(None)
    except TypeError:
        if transactional:
            raise ConfigurationError(
                f"the handler {handler!r} of a transactional consumer must take {what} "
                f"and its transaction, but its signature is {signature}; define it as "
                f"`{call}, tx): ...`"
            ) from None
        raise ConfigurationError(
            f"consumer handler {handler!r} must take {what} as its one positional "
            f"argument, but its signature is {signature}; define it as `{call}): ...`"
        ) from None
    takes = _annotated_kind(handler, signature)
    if batch and takes == "event":
        raise ConfigurationError(
            f"consumer handler {handler!r} is annotated to take one Event, but its "
            "consumer has batch=, so it is called with a sequence of events: annotate it "
            "`events: Sequence[Event]`, or drop batch="
        )
    if not batch and takes == "batch":
        raise ConfigurationError(
            f"consumer handler {handler!r} is annotated to take a sequence of events: give "
            "its consumer batch= (the most events per call, batch=1000, say), or make it "
            "take one Event"
        )


def _annotated_kind(
    handler: Callable[..., object], signature: inspect.Signature
) -> Literal["event", "batch"] | None:
    """What the handler's first parameter is annotated to take, if that is clear."""
    first = next(iter(signature.parameters.values()), None)
    if first is None or first.annotation is inspect.Parameter.empty:
        return None
    annotation: object = first.annotation
    if isinstance(annotation, str):
        try:
            target = (
                handler
                if inspect.isfunction(handler) or inspect.ismethod(handler)
                else type(handler).__call__
            )
            annotation = typing.get_type_hints(target).get(first.name, annotation)
        except Exception:  # An annotation that does not resolve: not ours to judge.
            return None
    if annotation is Event:
        return "event"
    origin = typing.get_origin(annotation)
    if origin in (list, tuple, collections.abc.Sequence, collections.abc.Iterable):
        return "batch"
    return None
