"""The ``trioflow`` command: run an App, and look after its store.

One click group, one module per group of subcommands: ``run`` (`._run`),
``status`` and ``tail`` (`._watch`), ``consumers`` (`._consumers`),
``dead-letters`` (`._dead_letters`), ``prune`` and ``migrate``
(`._maintenance`). They share the store option and the error handling of
`._common`: every failure is one line on stderr and an `ExitCode`.
"""

from __future__ import annotations

import click

from ._common import ExitCode, OneLineGroup
from ._consumers import consumers
from ._dead_letters import dead_letters
from ._maintenance import migrate, prune
from ._run import run_command
from ._watch import status, tail

__all__ = ["ExitCode", "cli", "main"]


#: The exit statuses, as ``trioflow --help`` lists them (`ExitCode`).
EPILOG = """\b
Exit statuses:
  0    done
  1    failed: the store failed or refused an operation; run: the flow stopped
  2    bad arguments: an option, a store URL, a consumer the store does not know
  3    the store cannot be reached, or holds no trioflow store
  4    refused as unsafe: a flow runs the consumer (--force), or pruning would
       pass a consumer's cursor
  5    the store's schema needs a migration (migrate --check, and the commands
       that will not migrate it: all but run and migrate)
  130  interrupted (Ctrl+C)
"""


@click.group(
    "trioflow",
    cls=OneLineGroup,
    epilog=EPILOG,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(package_name="trioflow", prog_name="trioflow")
def cli() -> None:
    """Run trioflow Apps and look after their stores.

    Every command takes --store URL; without it, $TRIOFLOW_STORE, else
    sqlite:///trioflow.db.
    """


cli.add_command(run_command)
cli.add_command(status)
cli.add_command(tail)
cli.add_command(consumers)
cli.add_command(dead_letters)
cli.add_command(prune)
cli.add_command(migrate)


def main() -> None:
    """The ``trioflow`` console script."""
    cli(prog_name="trioflow")
