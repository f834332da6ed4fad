"""A throwaway PostgreSQL cluster for tests that stop and start the server.

`Cluster.create` runs ``initdb`` in a temporary directory and ``pg_ctl`` starts
the server on a free port of 127.0.0.1, with trust authentication (superuser
``postgres``, database ``postgres``) and ``fsync`` on, so that an immediate
stop is a real crash with a real recovery. ``stop(mode="fast")`` is a clean
shutdown; ``stop(mode="immediate")`` kills the server without a checkpoint, as
a power loss of the server would (the operating system's cache survives, so
what was written to the WAL survives too).

The binaries are found on ``$PATH``, through ``pg_config --bindir``, or in
the Debian/Ubuntu layout ``/usr/lib/postgresql/<version>/bin``;
``$TRIOFLOW_TEST_PG_BINDIR`` overrides all three. PostgreSQL refuses to run as
root, so when the tests run as root (as CI does) the cluster belongs to, and
runs as, an unprivileged system user: ``$TRIOFLOW_TEST_PG_OS_USER``, else
``postgres`` if it exists, else ``nobody``.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import trio

StopMode = Literal["fast", "immediate"]

#: Seconds pg_ctl may take to start (crash recovery included) or stop the server.
PG_CTL_TIMEOUT = 60


class ClusterUnavailable(Exception):
    """The machine cannot run a throwaway cluster (no binaries, no user to run it as)."""


def find_bindir() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl``.

    Raises:
        ClusterUnavailable: No PostgreSQL server binaries were found.
    """
    override = os.environ.get("TRIOFLOW_TEST_PG_BINDIR")
    candidates: list[str] = []
    if override:
        candidates.append(override)
    else:
        initdb = shutil.which("initdb")
        if initdb is not None:
            candidates.append(os.path.dirname(os.path.realpath(initdb)))
        pg_config = shutil.which("pg_config")
        if pg_config is not None:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                found = subprocess.run(
                    [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
                )
                candidates.append(found.stdout.strip())
        # Debian and Ubuntu keep the server binaries off $PATH; newest first.
        candidates.extend(
            sorted(
                glob.glob("/usr/lib/postgresql/*/bin"),
                key=lambda path: (
                    int(Path(path).parent.name) if Path(path).parent.name.isdigit() else 0
                ),
                reverse=True,
            )
        )
    for candidate in candidates:
        bindir = Path(candidate)
        if all(os.access(bindir / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            return bindir
    where = override or "$PATH, pg_config --bindir or /usr/lib/postgresql/*/bin"
    raise ClusterUnavailable(
        f"no PostgreSQL server binaries (initdb, pg_ctl, postgres) in {where}; install the "
        "PostgreSQL server (for example apt-get install postgresql) or set "
        "TRIOFLOW_TEST_PG_BINDIR to the directory holding them"
    )


def _os_user() -> pwd.struct_passwd | None:
    """The unprivileged user to run the server as, or None to run it as ourselves."""
    if os.geteuid() != 0:
        return None
    names = [os.environ.get("TRIOFLOW_TEST_PG_OS_USER") or "", "postgres", "nobody"]
    for name in filter(None, names):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise ClusterUnavailable(
        "running as root, and PostgreSQL refuses to: create a user named postgres, or set "
        "TRIOFLOW_TEST_PG_OS_USER to an unprivileged user to run the test cluster as"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@attrs.define(eq=False)
class Cluster:
    """One throwaway cluster; make it with `create`, end it with `destroy`.

    ``start`` and ``stop`` are async (for use under a running flow); the
    ``_blocking`` forms are for synchronous fixtures.
    """

    bindir: Path
    base: Path
    port: int
    user: pwd.struct_passwd | None
    running: bool = False
    #: Whether it ever started (it keeps its port from then on).
    started: bool = False

    @classmethod
    def create(cls, *, bindir: Path | None = None) -> Cluster:
        """Run initdb in a new temporary directory; the server is not started yet.

        Raises:
            ClusterUnavailable: No binaries, or no user to run them as.
            RuntimeError: initdb failed (its output is in the message).
        """
        bindir = find_bindir() if bindir is None else bindir
        user = _os_user()
        base = Path(tempfile.mkdtemp(prefix="trioflow-pg-"))
        cluster = cls(bindir=bindir, base=base, port=_free_port(), user=user)
        atexit.register(cluster.destroy)
        try:
            if user is not None:
                os.chown(base, user.pw_uid, user.pw_gid)
            cluster._run_blocking(
                [
                    "initdb",
                    "--pgdata",
                    str(cluster.data),
                    "--auth=trust",
                    "--username=postgres",
                    "--encoding=UTF8",
                    "--locale=C",
                    # Skips only initdb's own final sync; the server runs with fsync on.
                    "--no-sync",
                ],
                "initdb",
            )
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    @property
    def data(self) -> Path:
        """The data directory."""
        return self.base / "data"

    @property
    def logfile(self) -> Path:
        """The server's log."""
        return self.base / "server.log"

    def url(self, database: str = "postgres", **options: object) -> str:
        """A ``postgresql://`` URL of this cluster, with query options (store options) added."""
        query = urllib.parse.urlencode({name: str(value) for name, value in options.items()})
        url = f"postgresql://postgres@127.0.0.1:{self.port}/{database}"
        return f"{url}?{query}" if query else url

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's log, for failure messages."""
        try:
            text = self.logfile.read_text(errors="replace")
        except OSError as exc:
            return f"(no server log: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def start_blocking(self) -> None:
        """Start the server and wait until it accepts connections (after any recovery)."""
        for attempt in range(3):
            try:
                self._run_blocking(self._start_args(), "pg_ctl start")
            except RuntimeError:
                # The free port may have been taken since we looked (first start only).
                if attempt == 2 or self.started or "could not bind" not in self.log_tail():
                    raise
                self.port = _free_port()
            else:
                break
        self.running = self.started = True

    def stop_blocking(self, mode: StopMode = "fast") -> None:
        """Stop the server (``fast``: clean shutdown; ``immediate``: a crash)."""
        self._run_blocking(self._stop_args(mode), f"pg_ctl stop -m {mode}")
        self.running = False

    async def start(self) -> None:
        """`start_blocking`, without blocking trio."""
        await self._run(self._start_args(), "pg_ctl start")
        self.running = self.started = True

    async def stop(self, mode: StopMode = "fast") -> None:
        """`stop_blocking`, without blocking trio."""
        await self._run(self._stop_args(mode), f"pg_ctl stop -m {mode}")
        self.running = False

    def destroy(self) -> None:
        """Stop the server if it runs and delete the directory; safe to call twice."""
        if self.running:
            with contextlib.suppress(Exception):
                self.stop_blocking("immediate")
        if (self.data / "postmaster.pid").exists():
            # Started but not recorded as running (a failed start): stop it anyway.
            with contextlib.suppress(Exception):
                self._run_blocking(self._stop_args("immediate"), "pg_ctl stop")
        shutil.rmtree(self.base, ignore_errors=True)
        atexit.unregister(self.destroy)

    def _start_args(self) -> list[str]:
        settings = {
            "port": str(self.port),
            "listen_addresses": "127.0.0.1",
            # No Unix socket: nothing to clean up, and no directory to agree on.
            "unix_socket_directories": "''",
            "fsync": "on",
            "synchronous_commit": "on",
            "max_connections": "100",
            "shared_buffers": "32MB",
        }
        options = " ".join(f"-c {name}={value}" for name, value in settings.items())
        return [
            "pg_ctl",
            "start",
            "--pgdata",
            str(self.data),
            "--log",
            str(self.logfile),
            "--wait",
            "--timeout",
            str(PG_CTL_TIMEOUT),
            "--options",
            options,
        ]

    def _stop_args(self, mode: StopMode) -> list[str]:
        return [
            "pg_ctl",
            "stop",
            "--pgdata",
            str(self.data),
            "--mode",
            mode,
            "--wait",
            "--timeout",
            str(PG_CTL_TIMEOUT),
        ]

    def _popen_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"cwd": str(self.base), "env": {**os.environ, "LC_ALL": "C"}}
        if self.user is not None:
            options.update(
                user=self.user.pw_uid,
                group=self.user.pw_gid,
                extra_groups=[],
                env={**options["env"], "HOME": str(self.base), "USER": self.user.pw_name},
            )
        return options

    def _command(self, args: Sequence[str]) -> list[str]:
        return [str(self.bindir / args[0]), *args[1:]]

    def _failed(self, what: str, returncode: int, output: bytes) -> RuntimeError:
        return RuntimeError(
            f"{what} failed (exit status {returncode}) for the test cluster in {self.base}:\n"
            f"{output.decode(errors='replace')[-3000:]}\nserver log:\n{self.log_tail()}"
        )

    def _run_blocking(self, args: Sequence[str], what: str) -> None:
        done = subprocess.run(
            self._command(args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            check=False,
            timeout=PG_CTL_TIMEOUT + 30,
            **self._popen_options(),
        )
        if done.returncode != 0:
            raise self._failed(what, done.returncode, done.stdout)

    async def _run(self, args: Sequence[str], what: str) -> None:
        with trio.fail_after(PG_CTL_TIMEOUT + 30):
            done = await trio.run_process(
                self._command(args),
                stdin=b"",
                capture_stdout=True,
                stderr=subprocess.STDOUT,
                check=False,
                **self._popen_options(),
            )
        if done.returncode != 0:
            raise self._failed(what, done.returncode, done.stdout)
