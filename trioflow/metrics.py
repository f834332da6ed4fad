"""Prometheus metrics and health checks of a running flow (the ``metrics`` extra).

Needs ``pip install 'trioflow[metrics]'`` (prometheus_client and h11).

Every value is read from `Flow.statistics` when Prometheus scrapes, by a
custom collector (`FlowCollector`): nothing is updated on the flow's hot
path for the metrics' sake. The histograms are the flow's own (recorded by
the dispatcher, the cursor writer and each consumer), exposed as they are.

`serve_metrics` serves them over HTTP from the flow's own trio thread, with
the health checks beside them on the same port::

    GET /metrics   the metrics, in Prometheus' text format (or OpenMetrics,
                   if the scraper asks for it)
    GET /livez     200 while the flow's event loop answers
    GET /readyz    200 when `Flow.readiness` says ready, else 503 and why

Example::

    async with trioflow.open_flow(app) as flow, trio.open_nursery() as nursery:
        port = await nursery.start(
            functools.partial(trioflow.metrics.serve_metrics, flow, port=9100)
        )
        ...
        nursery.cancel_scope.cancel()
"""

from __future__ import annotations

import functools
import http
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence

import trio

from ._errors import ConfigurationError

try:
    import h11
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import choose_encoder
    from prometheus_client.gc_collector import GCCollector
    from prometheus_client.metrics_core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        InfoMetricFamily,
        Metric,
    )
    from prometheus_client.platform_collector import PlatformCollector
    from prometheus_client.process_collector import ProcessCollector
except ImportError as exc:  # pragma: no cover - tested with the modules hidden
    raise ConfigurationError(
        f"trioflow.metrics needs prometheus_client and h11, which are not installed ({exc}); "
        "install them with: pip install 'trioflow[metrics]'"
    ) from exc

from ._flow import Flow
from ._histograms import HistogramSnapshot
from ._statistics import ConsumerStatistics, FlowStatistics

__all__ = ["FlowCollector", "serve_metrics"]

logger = logging.getLogger("trioflow.metrics")

#: Seconds a connection may take to send one whole request and read the
#: answer (also the longest a kept-alive connection may sit idle): a slow or
#: silent client never holds a task longer.
REQUEST_TIMEOUT = 10.0
#: The most bytes a request's line and headers may take; larger ones get 431.
MAX_REQUEST_BYTES = 16 * 1024
#: Connections served at once; further ones are closed at once.
MAX_CONNECTIONS = 64
#: Seconds a connection closed after a bad request may take to read its answer.
LINGER = 1.0
#: Seconds `/readyz` waits for the store when it asks it (`Flow.readiness`).
READY_STORE_TIMEOUT = 2.0

_PLAIN_TEXT = "text/plain; charset=utf-8"

#: The consumers' gauges: name, help, and how to read it from its statistics.
_CONSUMER_GAUGES: Sequence[tuple[str, str, Callable[[ConsumerStatistics], float]]] = (
    (
        "trioflow_consumer_lag",
        "Events the consumer has yet to handle: the flow's head minus its position.",
        lambda c: c.lag,
    ),
    (
        "trioflow_consumer_position",
        "The last sequence number the consumer handled or skipped.",
        lambda c: c.position,
    ),
    (
        "trioflow_consumer_cursor",
        "The consumer's durably committed cursor (a sequence number).",
        lambda c: c.cursor,
    ),
    (
        "trioflow_consumer_buffered_events",
        "Events waiting in the consumer's memory channel (its in-memory backlog).",
        lambda c: c.buffered,
    ),
    (
        "trioflow_consumer_buffered_bytes",
        "Bytes of event data in the consumer's memory channel.",
        lambda c: c.buffered_bytes,
    ),
    (
        "trioflow_consumer_attached",
        "1 while the consumer is fed live, 0 while it catches up from the store.",
        lambda c: c.attached,
    ),
    (
        "trioflow_consumer_owned",
        "1 while this flow owns the consumer (holds its lease), 0 while it stands by.",
        lambda c: c.owned,
    ),
    (
        "trioflow_consumer_halted",
        "1 while the consumer is halted at an event, waiting for flow.resume().",
        lambda c: c.halted,
    ),
    (
        "trioflow_consumer_stalled",
        "1 while the consumer is held up at an event: retrying a failing handler, or halted.",
        lambda c: c.stall is not None,
    ),
)
#: The consumers' counters (exposed with a ``_total`` suffix).
_CONSUMER_COUNTERS: Sequence[tuple[str, str, Callable[[ConsumerStatistics], float]]] = (
    (
        "trioflow_consumer_handled",
        "Events the consumer's handler finished since the flow started.",
        lambda c: c.processed,
    ),
    (
        "trioflow_consumer_failures",
        "Times the consumer's handler, or the store under it, failed.",
        lambda c: c.failures,
    ),
    (
        "trioflow_consumer_retries",
        "Handler calls for an event it had failed on before (retries in place).",
        lambda c: c.retries,
    ),
    (
        "trioflow_consumer_redelivered",
        "Events handed to the handler again after it had finished with them "
        "(requeued dead letters).",
        lambda c: c.redelivered,
    ),
    (
        "trioflow_consumer_restarts",
        "Times the consumer was restarted from its cursor after a store error.",
        lambda c: c.restarts,
    ),
    (
        "trioflow_consumer_dead_letters",
        "Events the consumer recorded as dead letters.",
        lambda c: c.dead_lettered,
    ),
)


def _buckets(snapshot: HistogramSnapshot) -> list[tuple[str, float]]:
    return [(_le(bound), float(count)) for bound, count in snapshot.cumulative()]


@functools.cache
def _le(bound: float) -> str:
    # Prometheus' own spelling: "0.005", "1.0", "+Inf".
    return "+Inf" if bound == float("inf") else repr(float(bound))


class FlowCollector:
    """A Prometheus collector of one flow's metrics, read from `Flow.statistics` at scrape time.

    Register it in any `prometheus_client.CollectorRegistry` (one flow per
    registry: the metrics of two would clash)::

        registry.register(trioflow.metrics.FlowCollector(flow))

    Collecting must happen in the flow's trio thread (as `serve_metrics` and
    trio web frameworks do), or in another thread of the process (such as
    prometheus_client's own ``start_http_server``): then it asks the flow's
    thread for the statistics, and waits for its event loop to answer.

    Args:
        flow: The running flow. The collector must be created in its trio
            thread.
    """

    def __init__(self, flow: Flow) -> None:
        if not isinstance(flow, Flow):
            raise ConfigurationError(f"FlowCollector needs a trioflow.Flow, got {flow!r}")
        self._flow = flow
        self._token = trio.lowlevel.current_trio_token()

    def describe(self) -> Iterable[Metric]:
        """The metric families it exposes, without samples (for registries' clash checks)."""
        return list(self._families(None))

    def collect(self) -> Iterable[Metric]:
        """The flow's metrics now."""
        if trio.lowlevel.in_trio_run():
            statistics = self._flow.statistics()
        else:
            statistics = trio.from_thread.run_sync(self._flow.statistics, trio_token=self._token)
        return list(self._families(statistics))

    def _families(self, stats: FlowStatistics | None) -> Iterator[Metric]:
        info = InfoMetricFamily("trioflow_flow", "The flow: its id as the holder of leases.")
        if stats is not None:
            info.add_metric([], {"holder": stats.holder})
        yield info
        head = GaugeMetricFamily(
            "trioflow_head", "The last sequence number the flow has fanned out."
        )
        published = CounterMetricFamily(
            "trioflow_published", "Events this flow has published since it started."
        )
        errors = CounterMetricFamily(
            "trioflow_store_errors",
            "Store calls of the flow that failed, by operation.",
            labels=["operation"],
        )
        latency = HistogramMetricFamily(
            "trioflow_publish_latency_seconds",
            "Seconds from a publish call to the commit of its events (group commit).",
        )
        batch = HistogramMetricFamily(
            "trioflow_publish_batch_size", "Events per group commit (one store append)."
        )
        commits = HistogramMetricFamily(
            "trioflow_cursor_commit_latency_seconds",
            "Seconds per cursor write (one store call carrying any number of cursors).",
        )
        if stats is not None:
            head.add_metric([], stats.head)
            published.add_metric([], stats.published)
            for operation, count in sorted(stats.store_errors.items()):
                errors.add_metric([operation], count)
            for family, snapshot in (
                (latency, stats.publish_latency),
                (batch, stats.batch_size),
                (commits, stats.cursor_commit_latency),
            ):
                family.add_metric([], _buckets(snapshot), snapshot.sum)
        yield from (head, published, errors, latency, batch, commits)
        consumers = sorted(stats.consumers.items()) if stats is not None else []
        for name, help_text, read in _CONSUMER_GAUGES:
            gauge = GaugeMetricFamily(name, help_text, labels=["consumer"])
            for consumer, c in consumers:
                gauge.add_metric([consumer], float(read(c)))
            yield gauge
        for name, help_text, read in _CONSUMER_COUNTERS:
            counter = CounterMetricFamily(name, help_text, labels=["consumer"])
            for consumer, c in consumers:
                counter.add_metric([consumer], float(read(c)))
            yield counter
        durations = HistogramMetricFamily(
            "trioflow_consumer_handler_duration_seconds",
            "Seconds per call of the consumer's handler, failed calls too.",
            labels=["consumer"],
        )
        for consumer, c in consumers:
            snapshot = c.handler_duration
            durations.add_metric([consumer], _buckets(snapshot), snapshot.sum)
        yield durations


async def serve_metrics(
    flow: Flow,
    *,
    port: int,
    host: str = "0.0.0.0",
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the flow's metrics and health checks over HTTP until cancelled.

    Run it beside the flow, in a nursery inside `trioflow.open_flow`'s block
    (or with the `Flow` that `trioflow.serve` hands back); ``nursery.start``
    returns the port it listens on once it does. Cancelling it closes the
    listener and every connection at once.

    ``GET /metrics`` answers with the flow's metrics (`FlowCollector`) and the
    process's (prometheus_client's process, platform and garbage collector
    collectors); ``GET /livez`` with 200 ``alive`` while the event loop answers;
    ``GET /readyz`` with 200 ``ready``, or 503 ``not ready:`` and the reasons,
    one a line (`Flow.readiness`, waiting at most `READY_STORE_TIMEOUT`
    seconds for the store). ``HEAD`` works too; other methods get 405, other
    paths 404, malformed requests 400. A connection must send each request
    (of at most `MAX_REQUEST_BYTES`) and take its answer within
    `REQUEST_TIMEOUT` seconds; `MAX_CONNECTIONS` are served at once. A bad
    request or a client that goes away never disturbs the flow.

    Args:
        flow: The running flow.
        port: The TCP port to listen on; 0 picks a free one (reported to
            ``task_status``).
        host: The address to listen on (``"0.0.0.0"``: every IPv4 address;
            ``"127.0.0.1"``: this host only; ``"::"``: every IPv6 address).
        task_status: Given the port it listens on, once it does.

    Raises:
        OSError: The port cannot be listened on (in use, or not permitted).
    """
    registry = CollectorRegistry()
    registry.register(FlowCollector(flow))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    server = _Server(flow, registry)
    listeners = await trio.open_tcp_listeners(port, host=host)
    if port == 0:
        # A host name of several addresses got a free port for each: keep
        # the one reported.
        for extra in listeners[1:]:
            await extra.aclose()
        listeners = listeners[:1]
    bound = listeners[0].socket.getsockname()[1]
    logger.info("serving metrics and health checks on %s:%d", host, bound)
    task_status.started(bound)
    await trio.serve_listeners(server.serve_connection, listeners)


class _Server:
    """The HTTP side of `serve_metrics`: one task per connection, requests parsed by h11."""

    def __init__(self, flow: Flow, registry: CollectorRegistry) -> None:
        self._flow = flow
        self._registry = registry
        self._connections = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        """Answer one connection's requests; whatever the client does, return quietly."""
        async with stream:
            try:
                self._connections.acquire_nowait()
            except trio.WouldBlock:
                return
            try:
                await self._serve(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # the client went away
            except Exception as exc:
                logger.error("serving a metrics request failed", exc_info=exc)
            finally:
                self._connections.release()

    async def _serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        while True:
            with trio.move_on_after(REQUEST_TIMEOUT):
                keep = await self._exchange(conn, stream)
                if keep and conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                    continue
            return

    async def _exchange(self, conn: h11.Connection, stream: trio.SocketStream) -> bool:
        """Read one request and answer it; whether the connection may serve another."""
        reader = _Reader(conn, stream)
        try:
            request = await reader.next_event()
            if not isinstance(request, h11.Request):
                return False  # closed by the client
            # A GET carries no body; one that does is answered, then closed.
            complete = isinstance(await reader.next_event(wait=False), h11.EndOfMessage)
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                status = exc.error_status_hint
                await _respond(
                    conn, stream, status, _PLAIN_TEXT, f"bad request: {exc}\n".encode(), close=True
                )
                await _linger(stream)
            return False
        method = request.method.decode("ascii", "replace").upper()
        extra: list[tuple[str, str]] = []
        if method not in ("GET", "HEAD"):
            status, content_type, body = 405, _PLAIN_TEXT, b"method not allowed: use GET\n"
            extra.append(("allow", "GET, HEAD"))
            complete = False
        else:
            try:
                status, content_type, body = await self._answer(request)
            except Exception as exc:
                logger.error("answering %r failed", request.target, exc_info=exc)
                status, content_type, body = 500, _PLAIN_TEXT, b"internal error: see the log\n"
        await _respond(
            conn,
            stream,
            status,
            content_type,
            body,
            close=not complete,
            head=method == "HEAD",
            extra=extra,
        )
        if not complete:
            await _linger(stream)
        return complete

    async def _answer(self, request: h11.Request) -> tuple[int, str, bytes]:
        """Status, content type and body for a GET of ``request.target``."""
        path = request.target.decode("ascii", "replace").partition("?")[0]
        if path == "/metrics":
            accept = ",".join(
                value.decode("latin-1") for name, value in request.headers if name == b"accept"
            )
            encoder, content_type = choose_encoder(accept)
            return 200, content_type, encoder(self._registry)
        if path == "/livez":
            return 200, _PLAIN_TEXT, b"alive\n"
        if path == "/readyz":
            readiness = await self._flow.readiness(store_timeout=READY_STORE_TIMEOUT)
            if readiness.ready:
                return 200, _PLAIN_TEXT, b"ready\n"
            text = "not ready:\n" + "".join(f"{reason}\n" for reason in readiness.reasons)
            return 503, _PLAIN_TEXT, text.encode()
        return 404, _PLAIN_TEXT, b"not found: try /metrics, /livez or /readyz\n"


class _Reader:
    """Reads one request's h11 events, at most `MAX_REQUEST_BYTES` from the socket."""

    def __init__(self, conn: h11.Connection, stream: trio.SocketStream) -> None:
        self._conn = conn
        self._stream = stream
        self._left = MAX_REQUEST_BYTES

    async def next_event(self, *, wait: bool = True) -> object:
        """The next h11 event, reading as needed (with ``wait=False``, only from what
        has arrived: ``h11.NEED_DATA`` if that is not enough).

        Raises:
            h11.RemoteProtocolError: The request is malformed, or too large (431).
        """
        while True:
            event = self._conn.next_event()
            if event is not h11.NEED_DATA or not wait:
                return event
            if self._left <= 0:
                raise h11.RemoteProtocolError(
                    f"the request is larger than {MAX_REQUEST_BYTES} bytes", error_status_hint=431
                )
            data = await self._stream.receive_some(self._left)
            self._left -= len(data)
            self._conn.receive_data(data)


async def _linger(stream: trio.SocketStream) -> None:
    """Close our side, then read what the client still sends (for at most `LINGER`
    seconds): closing a socket with unread data resets the connection, and the
    client could lose the answer it has not read yet."""
    with trio.move_on_after(LINGER):
        await stream.send_eof()
        while await stream.receive_some(MAX_REQUEST_BYTES):
            pass


async def _respond(
    conn: h11.Connection,
    stream: trio.SocketStream,
    status: int,
    content_type: str,
    body: bytes,
    *,
    close: bool,
    head: bool = False,
    extra: Sequence[tuple[str, str]] = (),
) -> None:
    headers = [
        ("content-type", content_type),
        ("content-length", str(len(body))),
        ("cache-control", "no-store"),
        *extra,
    ]
    if close:
        headers.append(("connection", "close"))
    reason = http.HTTPStatus(status).phrase.encode()
    data = conn.send(h11.Response(status_code=status, headers=headers, reason=reason))
    if not head:
        data = (data or b"") + (conn.send(h11.Data(data=body)) or b"")
    data = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
    await stream.send_all(data)
