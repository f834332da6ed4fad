"""Snapshots of a running flow: frozen values, taken by `Flow.statistics`."""

from __future__ import annotations

import datetime
from collections.abc import Mapping

import attrs

from ._histograms import HistogramSnapshot


@attrs.frozen(kw_only=True)
class Stall:
    """An event a consumer is held up at: its handler keeps failing on it, or it halted.

    Attributes:
        seq: The event's sequence number.
        type: The event's type.
        attempts: Failed calls of its handler for it so far.
        last_error: The last error, as ``"Type: message"``.
        next_attempt_at: When it is tried again (aware UTC); None when halted.
    """

    seq: int
    type: str
    attempts: int
    last_error: str
    next_attempt_at: datetime.datetime | None


@attrs.frozen(kw_only=True)
class ConsumerStatistics:
    """A snapshot of one consumer, from `Flow.statistics`.

    Attributes:
        cursor: Its durably committed cursor (last processed sequence number).
        position: The last sequence number it has handled (or skipped), which
            may be ahead of ``cursor`` until the next commit.
        head: The last sequence number the flow has fanned out.
        lag: ``head - position``: events it has yet to handle.
        buffered: Events waiting in its memory channel.
        buffered_bytes: Their total size (`Event.size`).
        attached: False while it catches up from the store (bounded mode).
        processed: Events its handler finished, since the flow started.
        failures: Times its handler (or the store under it) failed.
        retries: Calls of its handler for an event it had failed on before
            (each attempt after the first, retried in place).
        redelivered: Events its handler was given again after it had
            finished with them in this flow: requeued dead letters. (A
            restart within the flow redelivers nothing; what a crashed
            process had handled past its cursor, at most ``commit_every``
            events, is handled again by the next owner, which cannot tell.)
        restarts: Times it was restarted after a store error.
        dead_lettered: Events it recorded as dead letters, since the flow started.
        halted: Whether it stopped at an event (``on_exhausted="halt"``) and
            waits for `Flow.resume`.
        stall: The event it is held up at (retrying it, or halted at it), or
            None.
        owned: Whether this flow owns it (holds its lease) and handles its
            events; False while another flow does, and this one stands by.
        owner: The holder id of the flow that owns it as last seen (this
            flow's `FlowStatistics.holder` when ``owned``), or None when
            unknown (this flow lost it and has not seen the next owner yet).
        handler_duration: How long its handler calls took, in seconds,
            failed ones too (by `trio.current_time`).
    """

    cursor: int
    position: int
    head: int
    lag: int
    buffered: int
    buffered_bytes: int
    attached: bool
    processed: int
    failures: int
    retries: int
    redelivered: int
    restarts: int
    dead_lettered: int
    halted: bool
    stall: Stall | None
    owned: bool
    owner: str | None
    handler_duration: HistogramSnapshot


@attrs.frozen(kw_only=True)
class FlowStatistics:
    """A snapshot of a flow, from `Flow.statistics`.

    Attributes:
        head: The last sequence number the flow has fanned out.
        holder: This flow's id as the holder of leases (``host:pid:random``).
        published: Events this flow has published since it started.
        consumers: Each consumer's statistics, by name.
        publish_latency: Seconds from a publish call handing its events to
            the dispatcher until their group commit returned, per call that
            committed (a ``publish_many`` is one).
        batch_size: Events per group commit (one store append).
        cursor_commit_latency: Seconds per cursor write of the cursor writer
            (one store call, carrying any number of consumers' cursors).
        store_errors: Failed store calls since the flow started, by
            operation (the store method: ``append``, ``read``,
            ``commit_cursors``, ...), every operation the flow calls present.
    """

    head: int
    holder: str
    published: int
    consumers: Mapping[str, ConsumerStatistics]
    publish_latency: HistogramSnapshot
    batch_size: HistogramSnapshot
    cursor_commit_latency: HistogramSnapshot
    store_errors: Mapping[str, int]


@attrs.frozen(kw_only=True)
class Readiness:
    """Whether a flow is ready to work, from `Flow.readiness`, and if not, why.

    Attributes:
        ready: True when the flow runs (it is not stopping), its store
            answers, and each of its consumers is run by this flow or known
            to be run by another (this flow stands by).
        reasons: What is not ready, one short sentence each; empty when ready.
    """

    ready: bool
    reasons: tuple[str, ...]
