"""A TCP proxy in front of PostgreSQL that can lose the server's answer to one request.

It makes the faults a server restart produces only by chance, on demand:

* `LosingProxy.lose_answer_to`: the next request whose bytes contain a marker
  (say, an event type sent as a parameter) goes through, and the server runs
  it to the end (and commits it), but its answer, up to and including its
  ReadyForQuery message, is swallowed and both connections are closed: the
  client sees a lost connection, not the commit.
* `LosingProxy.lose_request_with`: the next request containing the marker is
  dropped and both connections are closed: the server never sees it.
* `LosingProxy.end_idle_sessions`: every client gets the FATAL error a server
  sends its idle sessions when it shuts down, but not (yet) the end of the
  connection that follows it: the window in which a pooled connection looks
  open although the server has ended it.

Use it with ``sslmode=disable``: the marker must be visible on the wire.
"""

from __future__ import annotations

import contextlib
import urllib.parse
from collections.abc import AsyncIterator

import attrs
import trio


def _has_ready_for_query(buffer: bytes) -> bool:
    """Whether the server's messages in ``buffer`` include a whole ReadyForQuery ('Z')."""
    at = 0
    while at + 5 <= len(buffer):
        kind = buffer[at]
        length = int.from_bytes(buffer[at + 1 : at + 5], "big")
        end = at + 1 + length
        if end > len(buffer):
            return False
        if kind == ord("Z"):
            return True
        at = end
    return False


def _fatal(code: str, message: str) -> bytes:
    """A FATAL ErrorResponse message, as the server sends it."""
    fields = b"".join(
        kind + value.encode() + b"\0"
        for kind, value in [(b"S", "FATAL"), (b"V", "FATAL"), (b"C", code), (b"M", message)]
    )
    body = fields + b"\0"
    return b"E" + (len(body) + 4).to_bytes(4, "big") + body


@attrs.define(eq=False)
class _Connection:
    scope: trio.CancelScope
    client: trio.SocketStream
    sending: trio.Lock = attrs.Factory(trio.Lock)
    losing: bool = False


@attrs.define(eq=False)
class LosingProxy:
    """See the module docstring. Make one with `open_proxy`."""

    target_host: str
    target_port: int
    port: int = 0
    #: Requests whose answer was swallowed so far.
    answers_lost: int = 0
    #: While true, new connections are closed as soon as they are accepted.
    refusing: bool = False
    _marker: bytes | None = None
    _lose_request: bool = False
    _refuse_after: bool = False
    _connections: set[_Connection] = attrs.Factory(set)

    def url(self, target_url: str, **options: object) -> str:
        """``target_url`` pointed at the proxy, with TLS off (so that the marker
        shows) and with the given query options (store options) added."""
        parts = urllib.parse.urlsplit(target_url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        query = [
            *urllib.parse.parse_qsl(parts.query),
            ("sslmode", "disable"),
            *((name, str(value)) for name, value in options.items()),
        ]
        return urllib.parse.urlunsplit(
            parts._replace(netloc=netloc, query=urllib.parse.urlencode(query))
        )

    def lose_answer_to(self, marker: bytes, *, then_refuse: bool = False) -> None:
        """Swallow the answer to the next request containing ``marker``.

        With ``then_refuse`` the proxy refuses new connections from then on
        (until ``refusing`` is set back to False): the server looks gone.
        """
        self._marker = marker
        self._lose_request = False
        self._refuse_after = then_refuse

    def lose_request_with(self, marker: bytes) -> None:
        """Drop the next request containing ``marker`` and close its connection."""
        self._marker = marker
        self._lose_request = True
        self._refuse_after = False

    async def end_idle_sessions(self) -> None:
        """Send every client a server's FATAL shutdown error; keep the sockets open."""
        message = _fatal("57P01", "terminating connection due to administrator command")
        for connection in list(self._connections):
            async with connection.sending:
                await connection.client.send_all(message)

    def drop_all(self) -> None:
        """Close every proxied connection, as a server restart would."""
        for connection in self._connections:
            connection.scope.cancel()

    async def _handle(self, client: trio.SocketStream) -> None:
        if self.refusing:
            await client.aclose()
            return
        try:
            server = await trio.open_tcp_stream(self.target_host, self.target_port)
        except OSError:
            await client.aclose()
            return
        async with client, server, trio.open_nursery() as nursery:
            connection = _Connection(nursery.cancel_scope, client)
            self._connections.add(connection)
            try:
                nursery.start_soon(self._upstream, connection, client, server)
                nursery.start_soon(self._downstream, connection, server, client)
                await trio.sleep_forever()
            finally:
                self._connections.discard(connection)

    async def _upstream(
        self, connection: _Connection, client: trio.SocketStream, server: trio.SocketStream
    ) -> None:
        tail = b""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while chunk := await client.receive_some():
                marker = self._marker
                if marker is not None and marker in tail + chunk:
                    self._marker = None
                    if self._lose_request:
                        break
                    connection.losing = True
                tail = chunk[-64:]
                await server.send_all(chunk)
        connection.scope.cancel()

    async def _downstream(
        self, connection: _Connection, server: trio.SocketStream, client: trio.SocketStream
    ) -> None:
        swallowed = b""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while chunk := await server.receive_some():
                if not connection.losing:
                    async with connection.sending:
                        await client.send_all(chunk)
                    continue
                swallowed += chunk
                if _has_ready_for_query(swallowed):
                    # The server is done with the request (and committed it):
                    # the client hears nothing but a closed connection.
                    self.answers_lost += 1
                    if self._refuse_after:
                        self.refusing = True
                    break
        connection.scope.cancel()


@contextlib.asynccontextmanager
async def open_proxy(target_url: str) -> AsyncIterator[LosingProxy]:
    """Run a `LosingProxy` in front of the server of ``target_url`` for the block."""
    parts = urllib.parse.urlsplit(target_url)
    proxy = LosingProxy(target_host=parts.hostname or "127.0.0.1", target_port=parts.port or 5432)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, proxy._handle, 0)
        proxy.port = listeners[0].socket.getsockname()[1]
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()
