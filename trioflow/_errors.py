"""The exceptions trioflow raises.

Every error trioflow raises on purpose derives from one root, so callers can
catch them all at once::

    TrioflowError
    ├── ConfigurationError      bad App or consumer settings: name, handler, options
    │   ├── UnknownStoreError   a store URL this version cannot open
    │   └── UnknownConsumerError    a consumer name this flow does not run
    ├── InvalidEventError       an event that cannot be published (type, key, data)
    ├── FlowClosedError         publishing on a flow that has stopped or is stopping
    ├── BackpressureError       a handler publishing would wait for its own consumer
    ├── ConsumerStateError      resuming a consumer that is not halted, and the like
    │   └── PrunedLogError      a cursor is, or would fall, behind the pruned log
    ├── UnknownDeadLetterError  requeuing or discarding a seq that is no dead letter
    ├── HandlerTimeoutError     a handler ran past its consumer's timeout
    ├── Reject                  raised by a handler: never retry this event
    ├── BatchError              raised by a batch handler: how far it got, and why it stopped
    ├── LeaseLostError          another flow took over a consumer this flow owned
    ├── QueryError              the database refused a statement of a transaction
    ├── TransactionClosedError  a Transaction used after its handler or block ended
    └── StoreError              the store failed or refused an operation
        ├── StoreUnavailableError   cannot reach or open the store; retrying may help
        ├── SchemaVersionError      the store holds a schema this version does not know
        └── OutcomeUnknownError     a publish was sent but never answered

An `InvalidEventError` or `FlowClosedError` from ``publish`` means nothing was
persisted. A `StoreError` from ``publish`` means the batch holding the event was
not committed (it was refused or rolled back, or never reached the store):
nothing was persisted and the call may be retried. The one exception is
`OutcomeUnknownError`: the batch reached the store but no answer came back (the
connection was lost and the store could not be asked again in time, or the
flow was stopped meanwhile). Then either all of the batch was committed, and
every consumer receives it, or none of it; retrying may persist it twice.
"""

from __future__ import annotations


class TrioflowError(Exception):
    """The root of every error trioflow raises on purpose."""


class ConfigurationError(TrioflowError):
    """An `App`, consumer or store setting is invalid.

    Raised at definition time (decorating a consumer, building an App), before
    anything touches a store.
    """


class UnknownStoreError(ConfigurationError):
    """A store URL names a scheme or form that this version of trioflow cannot open."""


class InvalidEventError(TrioflowError):
    """An event cannot be published: its type, key or data is invalid.

    Nothing was persisted; no other event of the same call was persisted either.
    """


class UnknownConsumerError(ConfigurationError):
    """The flow runs no consumer of that name."""


class FlowClosedError(TrioflowError):
    """The flow has stopped (or is stopping) and accepts no more events."""


class BackpressureError(TrioflowError):
    """A handler published while its own consumer (``overflow="block"``) is full.

    The publish would wait for that consumer to take events, which it cannot
    do while its handler waits: a deadlock. Nothing was persisted.
    """


class ConsumerStateError(TrioflowError):
    """A consumer is not in the state an operation needs (resuming one that is not halted)."""


class PrunedLogError(ConsumerStateError):
    """A consumer's cursor is, or would fall, behind the pruned log.

    Raised by a prune that would delete events some consumers' cursors still
    need, by `trioflow.stores.Store.set_cursor` given a position whose next
    events were pruned, and by a consumer that starts from a cursor whose next
    events were pruned. Nothing was changed; the message says what to do
    (reset the cursor, remove the consumer, or prune less).

    Attributes:
        consumers: The consumers concerned, by name, with their cursors.
    """

    def __init__(self, message: str, *, consumers: dict[str, int] | None = None) -> None:
        super().__init__(message)
        self.consumers: dict[str, int] = dict(consumers or {})


class UnknownDeadLetterError(TrioflowError):
    """A sequence number given to requeue or discard is not a dead letter of that consumer.

    Nothing was changed.
    """


class HandlerTimeoutError(TrioflowError):
    """A handler did not return within its consumer's ``timeout``; it was cancelled.

    Counts as a failure of that attempt, as an exception would.

    Attributes:
        consumer: The consumer's name.
        seq: The event's sequence number.
        timeout: The consumer's timeout, in seconds.
        elapsed: How long the handler ran, in seconds.
    """

    def __init__(self, consumer: str, seq: int, event_type: str, timeout: float, elapsed: float):
        super().__init__(
            f"the handler of consumer {consumer!r} did not return within its timeout of "
            f"{timeout:g}s on seq={seq} (type {event_type!r}); it was cancelled after "
            f"{elapsed:.3g}s"
        )
        self.consumer = consumer
        self.seq = seq
        self.timeout = timeout
        self.elapsed = elapsed


class Reject(TrioflowError):
    """Raised by a handler for an event it knows it can never handle.

    Its remaining attempts are skipped: the event is recorded as a dead letter
    (``on_exhausted="dead-letter"``, reason ``"rejected"``) or the consumer
    halts at it (``"halt"``, and ``"retry-forever"``, which never skips an
    event and would retry it in vain).

    Args:
        reason: Why, for the log and the dead letter's message.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BatchError(TrioflowError):
    """Raised by a batch consumer's handler (``batch=``) that handled part of its batch.

    The events before ``index`` are done: the consumer's position moves past
    them, and they are not handed over again (but for a crash, within the
    redelivery bound). The rest failed with ``cause``: the consumer's delivery
    policy decides on ``cause`` as on any handler failure (``retry_on``, and
    `Reject` to give up at once), and a retry hands over a batch that starts
    at the event at ``index``. Once the policy gives up, that event alone is
    a dead letter (or halts the consumer), and the rest goes on in batches.
    Any other exception from a batch handler means nothing of the batch was
    done, and names no event: a batch given up on is then handed over again
    one event at a time, to find the events that fail.

    In a transactional handler the whole transaction rolls back, so
    ``index`` is not used: none of the batch was done.

    Example::

        @app.consumer("loader", batch=1000)
        async def load(events: Sequence[trioflow.Event]) -> None:
            for index, event in enumerate(events):
                try:
                    await insert(event)
                except OSError as exc:
                    raise trioflow.BatchError(index, exc) from exc

    Args:
        index: The position in the batch of the first event not done (0: none
            was; at most the batch's length minus one).
        cause: Why the event at ``index`` failed.
    """

    def __init__(self, index: int, cause: Exception) -> None:
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise TypeError(f"BatchError's index must be an int >= 0, got {index!r}")
        if not isinstance(cause, Exception):
            raise TypeError(f"BatchError's cause must be an Exception, got {cause!r}")
        super().__init__(
            f"the batch handler did {index} event(s) of its batch, then failed: "
            f"{type(cause).__qualname__}: {cause}"
        )
        self.index = index
        self.cause = cause


class LeaseLostError(TrioflowError):
    """This flow no longer owns a consumer: another flow took its lease over.

    Raised by a fenced store write (a cursor commit, a dead letter) whose
    lease token is no longer the consumer's; the flow stops handling that
    consumer and stands by.
    """

    def __init__(self, message: str, *, keys: frozenset[str] = frozenset()) -> None:
        super().__init__(message)
        #: The consumers whose leases were lost.
        self.keys = keys


class QueryError(TrioflowError):
    """The database refused a statement run in a transaction (`trioflow.Transaction`).

    The message names the statement and says what the database said; the
    transaction rolls back. In a transactional handler it is a handler
    failure, and the consumer's delivery policy applies.
    """

    def __init__(self, message: str, *, query: str) -> None:
        super().__init__(message)
        #: The statement, as given (shortened in the message).
        self.query = query


class TransactionClosedError(TrioflowError):
    """A `trioflow.Transaction` was used after its handler returned or its block ended.

    Nothing was run: a transaction's statements never run outside it.
    """


class StoreError(TrioflowError):
    """The store failed or refused an operation."""


class StoreUnavailableError(StoreError):
    """The store cannot be reached or opened right now; retrying later may succeed."""


class SchemaVersionError(StoreError):
    """The store holds a schema version this version of trioflow does not know.

    Usually the store was written by a newer trioflow: upgrade trioflow, or point
    the App at another store.
    """


class OutcomeUnknownError(StoreError):
    """A publish reached the store but its answer was lost: it may have committed.

    Either the whole batch was committed (and every consumer receives it) or
    none of it. The message names an event id to look for before publishing
    again; retrying blindly may persist the events twice.
    """
