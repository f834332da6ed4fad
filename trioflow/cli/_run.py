"""``trioflow run module:app``: serve an App until a signal, then stop gracefully."""

from __future__ import annotations

import functools
import importlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import click
import trio

from .._app import App
from .._errors import ConfigurationError, TrioflowError
from .._flow import Flow, serve
from ._common import CommandError, ExitCode, exit_code_of, one_line, run

logger = logging.getLogger("trioflow.cli")

#: The signals that stop `trioflow run`: the first gracefully, a second at once.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

#: What `--metrics-port` needs, and how to get it.
METRICS_MISSING = (
    "--metrics-port needs trioflow's metrics extra, which is not installed: "
    "pip install 'trioflow[metrics]'"
)


def load_app(target: str) -> App:
    """The `App` named ``module:attribute`` (the attribute may be dotted).

    The working directory is searched first, as ``python -m`` does, so an
    application module beside the caller imports without installing it.

    Raises:
        CommandError: The target is malformed, does not import, or is no App.
    """
    module_name, colon, attribute = target.partition(":")
    if not colon or not module_name or not attribute:
        raise CommandError(
            f"{target!r} is not MODULE:APP; name the module and the App in it, "
            "for example myservice.main:app",
            ExitCode.USAGE,
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name or module_name.startswith(f"{exc.name}."):
            raise CommandError(
                f"no module named {module_name!r} (from {target!r}): run trioflow from the "
                "directory that holds it, or install it",
                ExitCode.USAGE,
            ) from None
        raise
    found: object = module
    for part in attribute.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise CommandError(
                f"module {module_name!r} has no attribute {attribute!r}: name the App it "
                "defines, as in MODULE:app",
                ExitCode.USAGE,
            ) from None
    if not isinstance(found, App):
        raise CommandError(
            f"{target} is a {type(found).__name__}, not a trioflow.App", ExitCode.USAGE
        )
    return found


def metrics_server() -> Callable[..., Awaitable[None]]:
    """``trioflow.metrics.serve_metrics``, imported only when asked for.

    Raises:
        CommandError: The metrics extra is not installed.
    """
    try:
        from ..metrics import serve_metrics
    except (ImportError, ConfigurationError):
        # trioflow.metrics says so with a ConfigurationError of its own.
        raise CommandError(METRICS_MISSING, ExitCode.USAGE) from None
    return serve_metrics


async def serve_until_signalled(
    app: App,
    *,
    metrics_port: int | None,
    serve_metrics: Callable[..., Awaitable[None]] | None,
) -> None:
    """Serve ``app`` until SIGINT or SIGTERM, then stop gracefully.

    The first signal stops the flow as leaving `open_flow` does: handlers in
    flight get the App's ``shutdown_grace``, every consumer's position is
    committed, its leases are released. A second signal ends the process at
    once, as a crash would: consumers then resume from their last committed
    cursors.
    """
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async with trio.open_nursery() as outer:
            # Outside the flow's scope: it must hear a second signal while
            # the flow stops.
            with trio.CancelScope() as serving:
                outer.start_soon(_stop_on_signals, signals, serving)
                async with trio.open_nursery() as nursery:
                    flow: Flow = await nursery.start(serve, app)
                    if serve_metrics is not None:
                        try:
                            port = await nursery.start(
                                functools.partial(serve_metrics, flow, port=metrics_port)
                            )
                        except OSError as exc:
                            raise CommandError(
                                f"--metrics-port {metrics_port}: cannot listen on it "
                                f"({exc.strerror or exc}); choose a free port, or 0 for any"
                            ) from None
                        logger.info("serving metrics and health checks on port %d", port)
                    logger.info(
                        "serving %d consumer(s) on %r as %s; SIGINT or SIGTERM stops",
                        len(app.consumers),
                        app.store,
                        flow.statistics().holder,
                    )
            outer.cancel_scope.cancel()


async def _stop_on_signals(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if not scope.cancel_called:
            logger.info("%s: stopping gracefully (send it again to stop at once)", name)
            scope.cancel()
            continue
        logger.warning("%s again: stopping at once; consumers resume from their cursors", name)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        # No cleanup on purpose: the graceful stop is what was skipped.
        os._exit(128 + signum)


@click.command("run")
@click.argument("target", metavar="MODULE:APP")
@click.option(
    "--store",
    "store_url",
    metavar="URL",
    default=None,
    help="Serve on this store instead of the App's own.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help=(
        "Serve Prometheus metrics and health checks (/metrics, /livez, /readyz) on this "
        "port; 0: any free port (logged). Needs trioflow[metrics]."
    ),
)
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default="INFO",
    show_default=True,
    help="The least severe log records shown (on stderr).",
)
def run_command(
    target: str, store_url: str | None, metrics_port: int | None, log_level: str
) -> None:
    """Serve the App MODULE:APP until SIGINT or SIGTERM, then stop gracefully.

    The first signal stops gracefully: handlers in flight get the App's
    shutdown_grace, every cursor is committed. A second one stops at once.
    """
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    app = load_app(target)
    if store_url is not None:
        try:
            app.use_store(store_url)
        except TrioflowError as exc:
            raise CommandError(str(exc), exit_code_of(exc)) from None
    serve_metrics = metrics_server() if metrics_port is not None else None

    async def body() -> None:
        await serve_until_signalled(app, metrics_port=metrics_port, serve_metrics=serve_metrics)

    try:
        run(body)
    except CommandError:
        raise
    except Exception as exc:
        # A handler's own error never gets here (its consumer's policy deals
        # with it); this is the flow or the metrics server failing for good.
        logger.debug("the flow stopped on an error", exc_info=True)
        raise CommandError(
            f"the flow stopped: {type(exc).__name__}: {one_line(str(exc))}", ExitCode.FAILED
        ) from None
    logger.info("stopped")
