"""Every code block in the README and in docs/ runs as written, or is checked as far as it can be.

Each fenced block of ``README.md`` and ``docs/**/*.md`` is one test, named by
its file and the line of its opening fence (``README.md:13``). Its language
tag says what it is, and so what is done with it (`LANGUAGES`):

``python``
    A complete program, run as a reader would run it: with this test run's
    interpreter, in a fresh temporary directory. It must exit with status 0
    within `TIMEOUT` seconds, which guards against a hang and measures
    nothing. It gets this environment without the variables of
    `POSTGRES_VARIABLES`, unless the doc tells the reader to set one (the
    block, or the text between it and the block or heading before it, names
    it): then that variable points at the PostgreSQL test server, and without
    a server the test is skipped, or fails under ``CI=true``.
``sh``, ``bash``, ``console``
    Commands, as typed in a checkout after the README's test set-up. Each is
    tested by the first rule of `SHELL_RULES` its words begin with (run, or
    checked without running), and a command no rule matches fails. Those
    that run, run in a copy of the repository with this venv first on PATH;
    a variable of `POSTGRES_VARIABLES` set before a command (``NAME=value
    command``) gets the test server's value instead. (In a ``console`` block
    with ``$ `` prompts, only the prompted lines are commands; the rest is
    output.)
``text``, ``sql``
    Shown to the reader, not run: output, the shape of a URL, SQL to run by
    hand.
``json``, ``toml``, ``yaml``
    Must parse.
``mermaid``
    A diagram, drawn by the documentation site (Material for MkDocs renders
    it in the reader's browser), not run: it must open with a diagram type
    mermaid knows, and ``mkdocs.yml`` must declare the ``mermaid`` fence, or
    the site would show its source instead.

A block with no language tag, or one not listed, fails: say what it is.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib
import io
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NoReturn

import attrs
import click
import pytest
from packaging.requirements import InvalidRequirement, Requirement

from benchmarks.__main__ import check_command_line
from tests.postgres._server import DEFAULT_URL, drop_schemas, require_server, with_options
from trioflow.cli import cli as trioflow_cli
from trioflow.cli._run import load_app

ROOT = Path(__file__).resolve().parent.parent

#: Seconds a program or command may take: a guard against a hang (a consumer
#: failing forever never lets ``wait_idle`` return), not a measure.
TIMEOUT = 120

#: The variables a doc may tell its reader to set to reach PostgreSQL. A block
#: that does not name them runs without them, as on a reader's machine.
POSTGRES_VARIABLES = ("TRIOFLOW_STORE", "TRIOFLOW_TEST_POSTGRES_URL")

#: The README's virtual environment: ``.venv/bin/NAME`` in a command is this
#: test run's NAME (the README's set-up made the environment the tests run in).
VENV_BIN = ".venv/bin/"

#: What a copy of the repository for running commands leaves out.
NOT_COPIED = shutil.ignore_patterns(
    ".git", ".venv", "venv", "__pycache__", "*_cache", ".hypothesis", "*.egg-info",
    "*.db", "*.db-*", "results", ".coverage", "htmlcov", "site",
)  # fmt: skip


# --- finding the blocks ---------------------------------------------------------------------

_OPENING = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


@attrs.frozen(kw_only=True)
class Block:
    """One fenced code block of a Markdown file.

    Attributes:
        path: The file, relative to the repository (``docs/postgres.md``).
        line: The line of the opening fence, counted from 1.
        language: The first word of the fence's info string, lower case; ``""`` if none.
        text: The block's lines, without the fence's indentation.
        before: The text between the block or heading before it and this block.
        closed: Whether a closing fence ends it (an unclosed one runs to the end of the file).
    """

    path: str
    line: int
    language: str
    text: str
    before: str
    closed: bool

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"


def parse_blocks(path: str, markdown: str) -> list[Block]:
    """The fenced code blocks of ``markdown`` (CommonMark fences of backticks or tildes)."""
    lines = markdown.splitlines()
    blocks: list[Block] = []
    before: list[str] = []
    index = 0
    while index < len(lines):
        opening = _OPENING.match(lines[index])
        if opening is None or (opening["fence"][0] == "`" and "`" in opening["info"]):
            is_heading = lines[index].lstrip(" ").startswith("#")
            before = [] if is_heading else [*before, lines[index]]
            index += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        closing = re.compile(rf"^ *{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        end = index + 1
        while end < len(lines) and not closing.match(lines[end]):
            end += 1
        body = [re.sub(rf"^ {{0,{indent}}}", "", line) for line in lines[index + 1 : end]]
        words = opening["info"].split()
        blocks.append(
            Block(
                path=path,
                line=index + 1,
                language=words[0].lower() if words else "",
                text="".join(line + "\n" for line in body),
                before="\n".join(before),
                closed=end < len(lines),
            )
        )
        before = []
        index = end + 1
    return blocks


def doc_files() -> list[Path]:
    """The README and every Markdown file under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def all_blocks() -> list[Block]:
    return [
        block
        for path in doc_files()
        for block in parse_blocks(path.relative_to(ROOT).as_posix(), path.read_text("utf-8"))
    ]


# --- what every run of a program or a command shares ------------------------------------------

#: Gives the value of a variable of `POSTGRES_VARIABLES` on the test server.
Server = Callable[[str], str]


@pytest.fixture
def server() -> Iterator[Server]:
    """The test server's value for a variable of `POSTGRES_VARIABLES`.

    ``TRIOFLOW_STORE`` gets a fresh schema each time, dropped afterwards. Asking
    for a value skips the test (fails it under CI=true) without a server.
    """
    url: str | None = None
    schemas: list[str] = []

    def value(name: str) -> str:
        nonlocal url
        url = url or require_server()
        if name == "TRIOFLOW_STORE":
            schemas.append(f"tf_docs_{uuid.uuid4().hex[:12]}")
            return with_options(url, schema=schemas[-1])
        return url

    yield value
    if url is not None and schemas:
        drop_schemas(url, schemas)


def environment(variables: Mapping[str, str]) -> dict[str, str]:
    """A reader's environment after the README's set-up, with ``variables`` set.

    That is this one without `POSTGRES_VARIABLES`, with this venv first on PATH.
    """
    env = {name: value for name, value in os.environ.items() if name not in POSTGRES_VARIABLES}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return env | dict(variables)


def finish(argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], what: str) -> None:
    """Run ``argv`` to the end; fail unless it exits 0 within `TIMEOUT`."""
    try:
        done = subprocess.run(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"{what}: still running after {TIMEOUT} s, so it hangs; "
            f"its output so far:\n{_text(exc.stdout)}\n{_text(exc.stderr)}"
        )
    if done.returncode != 0:
        pytest.fail(
            f"{what}: exit status {done.returncode}; "
            f"its output:\n{_text(done.stdout)}\n{_text(done.stderr)}"
        )


def _text(output: bytes | str | None) -> str:
    """Output to show in a failure: its beginning and its end, if it is long."""
    text = output.decode(errors="replace") if isinstance(output, bytes) else output or ""
    return text if len(text) <= 6000 else f"{text[:3000]}\n[...]\n{text[-3000:]}"


@attrs.frozen
class Context:
    """What a block's test has to work with: its own temporary directory and the test server."""

    tmp_path: Path
    server: Server


# --- python ---------------------------------------------------------------------------------


def told_variables(block: Block) -> list[str]:
    """The variables of `POSTGRES_VARIABLES` the doc tells the reader to set for ``block``."""
    return [name for name in POSTGRES_VARIABLES if name in block.text or name in block.before]


def run_python(block: Block, context: Context) -> None:
    """Run the block as a program in a fresh directory: it must exit 0.

    First every name it uses must be defined (ruff's F821), also in code the
    run does not reach, such as a function nobody calls.
    """
    program = context.tmp_path / "block.py"
    program.write_text(block.text, encoding="utf-8")
    lint = [sys.executable, "-m", "ruff", "check", "--isolated", "--no-cache", "--quiet"]
    lint += ["--select", "F821", "--output-format", "json", program.name]
    done = subprocess.run(
        lint, cwd=context.tmp_path, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    if done.returncode not in (0, 1):
        pytest.fail(f"{block.id}: ruff could not check it: {done.stderr}")
    undefined = [
        f"{block.path}:{block.line + found['location']['row']}: {found['message']}"
        for found in json.loads(done.stdout)
    ]
    if undefined:
        pytest.fail(f"{block.id}: not a complete program:\n" + "\n".join(undefined))
    env = environment({name: context.server(name) for name in told_variables(block)})
    finish([sys.executable, program.name], cwd=context.tmp_path, env=env, what=block.id)


# --- shell ----------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Command:
    """One simple command of a shell block.

    Attributes:
        line: Its line in the doc.
        env: The ``NAME=value`` assignments written before it.
        words: Its words, with `VENV_BIN` taken off the first.
    """

    line: int
    env: Mapping[str, str]
    words: tuple[str, ...]

    def __str__(self) -> str:
        return shlex.join([*(f"{name}={value}" for name, value in self.env.items()), *self.words])


class ShellSyntaxError(ValueError):
    """A shell block uses more of the shell than these tests understand."""


def shell_commands(block: Block) -> list[Command]:
    """The commands of a shell block: lines joined at a trailing backslash, split at ``&&``.

    Raises:
        ShellSyntaxError: A line uses another operator (``|``, ``;``, ``>``...),
            or has nothing but assignments.
    """
    lines = block.text.splitlines()
    prompted = block.language == "console" and any(line.startswith("$ ") for line in lines)
    logical: list[tuple[int, str]] = []
    continued = False
    for number, line in enumerate(lines, start=block.line + 1):
        if continued:
            logical[-1] = (logical[-1][0], logical[-1][1] + " " + line.removesuffix("\\"))
        elif prompted and not line.startswith("$ "):
            continue  # output shown to the reader
        else:
            logical.append((number, line.removeprefix("$ ").removesuffix("\\")))
        continued = line.endswith("\\")
    commands: list[Command] = []
    for number, line in logical:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        for is_and, group in itertools.groupby(tokens, key=lambda token: token == "&&"):
            if is_and:
                continue
            words = list(group)
            operators = [word for word in words if set(word) <= set("();<>|&")]
            if operators:
                raise ShellSyntaxError(
                    f"{block.path}:{number}: {operators[0]!r}: these tests understand && only"
                )
            env: dict[str, str] = {}
            while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
                name, _, value = words.pop(0).partition("=")
                env[name] = value
            if not words:
                raise ShellSyntaxError(f"{block.path}:{number}: assignments and no command")
            words[0] = words[0].removeprefix(VENV_BIN)
            commands.append(Command(line=number, env=env, words=tuple(words)))
    return commands


@attrs.define(eq=False)
class Shell:
    """Runs and checks the commands of one shell block, in order."""

    block: Block
    context: Context
    #: Files the block's commands write (a profiler's ``-o FILE``), for the ones that read them.
    written: set[str] = attrs.Factory(set)
    _repo: Path | None = None
    _rule: Rule | None = None

    def fail(self, command: Command, message: str) -> NoReturn:
        rule = (
            f" (the rule for {' '.join(self._rule.words)}: {self._rule.why})" if self._rule else ""
        )
        pytest.fail(f"{self.block.path}:{command.line}: `{command}`: {message}{rule}")

    def test(self, command: Command) -> None:
        """Test ``command`` by the first rule of `SHELL_RULES` it matches."""
        self._rule = next((rule for rule in SHELL_RULES if rule.matches(command.words)), None)
        if self._rule is None:
            self.fail(command, "no rule of SHELL_RULES says how to test it: add one")
        self._rule.test(self, command)

    def repo(self) -> Path:
        """A copy of the repository, made on first use: commands may write files in it."""
        if self._repo is None:
            self._repo = self.context.tmp_path / "repo"
            shutil.copytree(ROOT, self._repo, ignore=NOT_COPIED)
        return self._repo

    def run(self, command: Command, argv: Sequence[str]) -> None:
        """Run ``argv`` for ``command`` in the copy of the repository; it must exit 0."""
        variables = {
            name: self.context.server(name) if name in POSTGRES_VARIABLES else value
            for name, value in command.env.items()
        }
        where = f"{self.block.path}:{command.line}: `{command}`"
        finish(argv, cwd=self.repo(), env=environment(variables), what=where)


def run_command(shell: Shell, command: Command) -> None:
    shell.run(command, command.words)


def check_venv(shell: Shell, command: Command) -> None:
    if command.words[3:] != (VENV_BIN.split("/")[0],):
        shell.fail(command, f"the commands after it use {VENV_BIN}: make that one")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    if not re.search(r"^python3 -m venv ", ci, re.MULTILINE):
        shell.fail(command, ".ci/run no longer makes its virtual environment this way")


#: pip's options that a doc may use: they take no value.
PIP_FLAGS = frozenset({"-q", "--quiet", "-U", "--upgrade", "-e", "--editable"})


def check_pip_install(shell: Shell, command: Command) -> None:
    for argument in command.words[2:]:
        if argument.startswith("-"):
            if argument not in PIP_FLAGS:
                shell.fail(command, f"{argument}: not an option this rule knows (PIP_FLAGS)")
        elif argument.startswith((".", "/")):
            project = re.fullmatch(r"(?P<path>[^\[]+)(?:\[(?P<extras>[^\]]*)\])?", argument)
            pyproject = ROOT / project["path"] / "pyproject.toml" if project else None
            if project is None or pyproject is None or not pyproject.is_file():
                shell.fail(command, f"{argument}: no project there")
            declared = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"].get(
                "optional-dependencies", {}
            )
            extras = [extra.strip() for extra in (project["extras"] or "").split(",") if extra]
            missing = [extra for extra in extras if extra not in declared]
            if missing:
                shell.fail(command, f"{pyproject.relative_to(ROOT)} has no extra {missing}")
        else:
            try:
                Requirement(argument)
            except InvalidRequirement as exc:
                shell.fail(command, f"{argument}: not a requirement: {exc}")


def collect_tests(shell: Shell, command: Command) -> None:
    arguments = command.words[1:] if command.words[0] == "pytest" else command.words[3:]
    argv = ["python", "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    shell.run(command, [*argv, *arguments])


def check_benchmark_line(shell: Shell, command: Command) -> None:
    module, arguments = command.words[2], list(command.words[3:])
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            if module == "benchmarks":
                check_command_line(arguments)
            else:
                importlib.import_module(module).build_parser().parse_args(arguments)
    except SystemExit as exc:
        if exc.code not in (0, None):
            refusal = (errors.getvalue().strip().splitlines() or [f"exit status {exc.code}"])[-1]
            shell.fail(command, f"refused by its own parser: {refusal}")


def check_profiled(shell: Shell, command: Command) -> None:
    words = command.words
    if "--" in words:
        own, profiled = words[: words.index("--")], words[words.index("--") + 1 :]
    elif "-m" in words[3:]:
        at = words.index("-m", 3)
        own, profiled = words[:at], ("python", *words[at:])
    else:
        shell.fail(command, "no profiled command: `-- COMMAND` or `-m MODULE`")
    shell.written.update(value for flag, value in itertools.pairwise(own) if flag == "-o")
    shell.test(attrs.evolve(command, words=profiled))


def check_profile_read(shell: Shell, command: Command) -> None:
    if len(command.words) != 4 or command.words[3] not in shell.written:
        shell.fail(
            command, f"no earlier command of the block writes it (-o); written: {shell.written}"
        )


#: mkdocs options a doc may use: they take no value.
MKDOCS_FLAGS = frozenset({"--strict", "--clean", "-q", "--quiet", "-v", "--verbose"})


def check_mkdocs(shell: Shell, command: Command) -> None:
    """The site's configuration is there, and the ``docs`` extra brings mkdocs."""
    unknown = [word for word in command.words[2:] if word not in MKDOCS_FLAGS]
    if unknown:
        shell.fail(command, f"{unknown[0]}: not an option this rule knows (MKDOCS_FLAGS)")
    if not (ROOT / "mkdocs.yml").is_file():
        shell.fail(command, "no mkdocs.yml at the repository's root")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    docs = extras.get("optional-dependencies", {}).get("docs", [])
    if "mkdocs" not in {Requirement(requirement).name for requirement in docs}:
        shell.fail(command, "pyproject.toml's `docs` extra does not install mkdocs")


#: Options with which a `trioflow` command never ends by itself.
ENDLESS = frozenset({"--follow", "-f", "--watch"})


def parse_trioflow(shell: Shell, command: Command) -> click.Command:
    """Parse ``command``'s arguments as the `trioflow` command would; its subcommand."""
    words = list(command.words[1:])
    chosen: click.Command = trioflow_cli
    while isinstance(chosen, click.Group):
        if not words or words[0] not in chosen.commands:
            shell.fail(command, f"no command {words[0] if words else ''!r} in {chosen.name}")
        chosen = chosen.commands[words.pop(0)]
    try:
        chosen.make_context(chosen.name, words)
    except click.ClickException as exc:
        shell.fail(command, f"refused by its own parser: {exc.format_message()}")
    return chosen


def check_trioflow_run(shell: Shell, command: Command) -> None:
    parse_trioflow(shell, command)
    target = next(word for word in command.words[2:] if not word.startswith("-"))
    try:
        load_app(target)
    except click.ClickException as exc:
        shell.fail(command, exc.format_message())


def run_trioflow(shell: Shell, command: Command) -> None:
    parse_trioflow(shell, command)
    if not ENDLESS.intersection(command.words):
        run_command(shell, command)


def check_createdb(shell: Shell, command: Command) -> None:
    database = DEFAULT_URL.rsplit("/", 1)[1]
    if command.words[1:] != (database,):
        shell.fail(command, f"the tests' database is {database!r} ({DEFAULT_URL})")


@attrs.frozen
class Rule:
    """Commands whose first words match ``words`` (a shell pattern each) are tested by ``test``."""

    words: tuple[str, ...]
    test: Callable[[Shell, Command], None]
    #: What the rule does and why (failures quote it).
    why: str

    def matches(self, words: Sequence[str]) -> bool:
        return len(words) >= len(self.words) and all(
            fnmatch.fnmatchcase(word, pattern)
            for word, pattern in zip(words, self.words, strict=False)
        )


_PROFILER = "not run: the command it profiles is tested by these rules; its -o FILE is noted"
_PYTEST = (
    "collected, not run (--collect-only): the tests named must be found; the suite runs them, "
    "and running it here would run this test inside itself"
)

#: How each shell command is tested: by the first rule its words begin with.
#: Run: what is quick from a checkout (in a copy of it, with this venv first on
#: PATH). Checked without running: what takes minutes (a benchmark, pip), needs
#: the network, is interactive, or is a set-up step CI itself performs.
SHELL_RULES: tuple[Rule, ...] = (
    Rule(
        ("python3", "-m", "venv"),
        check_venv,
        "not run: these tests run in such an environment, and .ci/run makes a fresh one with "
        "this same command; it must make the .venv the later commands use",
    ),
    Rule(
        ("pip", "install"),
        check_pip_install,
        "not run (the network, minutes): what it names must exist: a project here with the "
        "extras it declares in pyproject.toml, or a well-formed requirement",
    ),
    Rule(("python", "-m", "pytest"), collect_tests, _PYTEST),
    Rule(("pytest",), collect_tests, _PYTEST),
    Rule(("python", "-m", "benchmarks", "list"), run_command, "run: it takes a second"),
    Rule(
        ("python", "-m", "benchmarks"),
        check_benchmark_line,
        "parsed, not run (a benchmark takes minutes): benchmarks.__main__.check_command_line",
    ),
    Rule(
        ("python", "-m", "benchmarks.*"),
        check_benchmark_line,
        "parsed, not run (a benchmark program takes minutes): by the module's build_parser()",
    ),
    Rule(("python", "-m", "cProfile"), check_profiled, _PROFILER),
    Rule(("python", "-m", "pyinstrument"), check_profiled, _PROFILER),
    Rule(("py-spy", "record"), check_profiled, _PROFILER),
    Rule(
        ("python", "-m", "pstats"),
        check_profile_read,
        "not run (interactive): an earlier command of the block must write the profile it reads",
    ),
    Rule(
        ("mkdocs", "serve"),
        check_mkdocs,
        "not run (it serves until stopped): mkdocs.yml must exist and the `docs` extra must "
        "install mkdocs; .ci/run builds the site with `mkdocs build --strict`",
    ),
    Rule(
        ("mkdocs", "build"),
        check_mkdocs,
        "not run (the `docs` extra is not installed with the tests'): mkdocs.yml must exist and "
        "the `docs` extra must install mkdocs; .ci/run builds the site with --strict",
    ),
    Rule(
        ("createdb",),
        check_createdb,
        "not run (the database exists where the tests run): it must be the tests' database",
    ),
    Rule(("python",), run_command, "run"),
    Rule(
        ("trioflow", "run"),
        check_trioflow_run,
        "parsed by the command's own parser, and its MODULE:APP imported, not run: it serves "
        "until a signal",
    ),
    Rule(
        ("trioflow",),
        run_trioflow,
        "parsed by the command's own parser, then run in the copy of the repository (a store "
        "file there is the docs' own), unless it follows or watches (--follow, --watch): it "
        "would not end by itself",
    ),
)


def run_shell(block: Block, context: Context) -> None:
    """Test each command of the block by `SHELL_RULES`, in order."""
    try:
        commands = shell_commands(block)
    except ShellSyntaxError as exc:
        pytest.fail(str(exc))
    if not commands:
        pytest.fail(f"{block.id}: a shell block without a command")
    shell = Shell(block, context)
    for command in commands:
        shell.test(command)


# --- shown, or parsed -----------------------------------------------------------------------


def shown(block: Block, context: Context) -> None:
    """Shown to the reader, not run."""


def check_json(block: Block, context: Context) -> None:
    json.loads(block.text)


def check_toml(block: Block, context: Context) -> None:
    tomllib.loads(block.text)


_YAML_KEY = re.compile(
    r"""(?:"[^"]*"|'[^']*'|[^\s#'"\-?:,\[\]{}][^#]*?)\s*:(?:\s+(?P<value>.*))?"""
)


def check_yaml(block: Block, context: Context) -> None:
    """Parse it with PyYAML where installed; else check the block structure YAML needs.

    Without PyYAML (not a dependency): no tab in any indentation, and every line
    is a ``key: value``, a ``- item``, a document marker, or the continuation
    of a value (more indented than its key, or inside a ``|``/``>`` block scalar).
    """
    try:
        yaml = importlib.import_module("yaml")
    except ModuleNotFoundError:
        check_yaml_shape(block.text)
    else:
        list(yaml.safe_load_all(block.text))


def check_yaml_shape(text: str) -> None:
    """The check of `check_yaml` without PyYAML. Raises ValueError naming the first bad line."""
    key_indent = -1  # of the last key: deeper lines continue its value
    scalar_indent: int | None = None  # of the key whose value is a block scalar
    for number, line in enumerate(text.splitlines(), start=1):
        content = line.lstrip(" ")
        indent = len(line) - len(content)
        if not content or content.startswith("#"):
            continue
        if content.startswith("\t"):
            raise ValueError(f"line {number}: a tab in the indentation")
        if scalar_indent is not None and indent > scalar_indent:
            continue
        scalar_indent = None
        if content in ("---", "..."):
            key_indent = -1
            continue
        item = re.match(r"(?:-(?: +|$))+", content)
        rest = content[item.end() :] if item else content
        key = _YAML_KEY.fullmatch(rest)
        if key is not None:
            key_indent = indent + (item.end() if item else 0)
            if re.fullmatch(r"[|>][-+0-9]*(?:\s+#.*)?", key["value"] or ""):
                scalar_indent = key_indent
        elif item is None and indent <= key_indent:
            raise ValueError(f"line {number}: neither `key: value` nor `- item`: {content!r}")


#: The diagram types a mermaid block may open with.
MERMAID_DIAGRAMS = frozenset(
    {"flowchart", "graph", "sequenceDiagram", "stateDiagram", "stateDiagram-v2",
     "classDiagram", "erDiagram", "gantt", "pie", "timeline"}
)  # fmt: skip


def check_mermaid(block: Block, context: Context) -> None:
    """Shown as a diagram by the site: a known diagram type, and a fence the site renders."""
    first = next((line.split() for line in block.text.splitlines() if line.strip()), [""])
    if first[0] not in MERMAID_DIAGRAMS:
        pytest.fail(f"{block.id}: opens with {first[0]!r}, not a diagram type: {MERMAID_DIAGRAMS}")
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    if not re.search(r"^\s*- name: mermaid$", config, re.MULTILINE):
        pytest.fail(f"{block.id}: mkdocs.yml declares no `mermaid` fence: the site shows code")


#: What each language tag makes of a block (see the module's docstring).
LANGUAGES: dict[str, Callable[[Block, Context], None]] = {
    "python": run_python,
    "sh": run_shell,
    "bash": run_shell,
    "console": run_shell,
    "text": shown,
    "sql": shown,
    "json": check_json,
    "toml": check_toml,
    "yaml": check_yaml,
    "yml": check_yaml,
    "mermaid": check_mermaid,
}


def needs_postgres(block: Block) -> bool:
    """Whether testing ``block`` needs the PostgreSQL test server (see `POSTGRES_VARIABLES`)."""
    if block.language == "python":
        return bool(told_variables(block))
    if LANGUAGES.get(block.language) is run_shell:
        with contextlib.suppress(ShellSyntaxError):
            commands = shell_commands(block)
            return any(name in POSTGRES_VARIABLES for c in commands for name in c.env)
    return False


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(
            block, id=block.id, marks=[pytest.mark.postgres] if needs_postgres(block) else []
        )
        for block in all_blocks()
    ],
)
def test_block(block: Block, tmp_path: Path, server: Server) -> None:
    if not block.closed:
        pytest.fail(f"{block.id}: the block has no closing fence")
    check = LANGUAGES.get(block.language)
    if check is None:
        pytest.fail(
            f"{block.id}: a block tagged {block.language or 'nothing'!r}: tag it with what it is: "
            f"{', '.join(sorted(LANGUAGES))} (`text` for output and anything not meant to run)"
        )
    check(block, Context(tmp_path, server))


# --- pages that say the same thing ---------------------------------------------------------


def table_under(markdown: str, heading: str) -> list[str]:
    """The rows of the first table after ``heading``, each link reduced to its text."""
    after = markdown.split(f"\n{heading}\n", 1)[1]
    rows = itertools.dropwhile(lambda line: not line.startswith("|"), after.splitlines())
    table = itertools.takewhile(lambda line: line.startswith("|"), rows)
    return [re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", row) for row in table]


def test_the_site_states_the_readmes_guarantees() -> None:
    # docs/guarantees.md holds the README's table for the site, whose pages
    # cannot link to the README; only where the links point may differ.
    readme = table_under((ROOT / "README.md").read_text("utf-8"), "## Guarantees")
    site = table_under((ROOT / "docs" / "guarantees.md").read_text("utf-8"), "## In short")
    assert readme
    assert site == readme, (
        "README.md's ## Guarantees table and docs/guarantees.md's ## In short table differ: "
        "change both alike (a link's text must match; on the site it points to a page of docs/)"
    )


# --- the machinery above can fail ----------------------------------------------------------


def test_blocks_are_found_with_their_language_line_and_text() -> None:
    markdown = "\n".join(
        [
            "# Title",  # 1
            "Set TRIOFLOW_STORE first.",
            "```python title",
            "print(1)",
            "```",
            "## Next",  # 6
            "- a list item:",
            "  ~~~~",
            "  ```not a fence here",
            "    indented",
            "  ~~~~",
            "````",  # 12
            "no closing fence",
        ]
    )
    blocks = parse_blocks("doc.md", markdown)
    assert [(b.id, b.language, b.text, b.closed) for b in blocks] == [
        ("doc.md:3", "python", "print(1)\n", True),
        ("doc.md:8", "", "```not a fence here\n  indented\n", True),
        ("doc.md:12", "", "no closing fence\n", False),
    ]
    assert told_variables(blocks[0]) == ["TRIOFLOW_STORE"]
    assert blocks[1].before == "- a list item:"


def test_shell_lines_become_commands() -> None:
    text = (
        "$ python3 -m venv .venv && .venv/bin/pip install '.[test]'  # set up\n"
        "output\n"
        "$ A=1 python -m benchmarks run fanout \\\n"
        "    --store memory\n"
    )
    block = Block(path="d.md", line=10, language="console", text=text, before="", closed=True)
    assert [(c.line, dict(c.env), c.words) for c in shell_commands(block)] == [
        (11, {}, ("python3", "-m", "venv", ".venv")),
        (11, {}, ("pip", "install", ".[test]")),
        (13, {"A": "1"}, ("python", "-m", "benchmarks", "run", "fanout", "--store", "memory")),
    ]
    piped = attrs.evolve(block, language="sh", text="python -m benchmarks list | head\n")
    with pytest.raises(ShellSyntaxError, match=r"d.md:11: '\|'"):
        shell_commands(piped)


@pytest.mark.parametrize(
    ("line", "failure"),
    [
        ("python -m benchmarks run fanout --no-such-option", "unrecognized arguments"),
        ("python -m benchmarks run fanout --case no-such-case", "unknown case no-such-case"),
        ("python -m benchmarks.redis_fanout --no-such-option", "unrecognized arguments"),
        ("pip install '.[no-such-extra]'", r"has no extra \['no-such-extra'\]"),
        ("pip install --user trio", "not an option this rule knows"),
        ("pip install 'not a requirement!'", "not a requirement"),
        ("python3 -m venv elsewhere", "make that one"),
        ("python -m pstats never-written.prof", "no earlier command of the block writes it"),
        ("createdb another", "the tests' database is 'test'"),
        ("mkdocs serve --no-livereload", "not an option this rule knows"),
        ("python -m pytest tests/no_such_tests.py", "exit status 4"),
        ("python -c 'raise SystemExit(3)'", "exit status 3"),
        ("curl https://example.com", "no rule of SHELL_RULES"),
        ("trioflow tail --no-such-option", "No such option '--no-such-option'"),
        ("trioflow status --watch --interval 0", "refused by its own parser"),
        ("trioflow no-such-command", "no command 'no-such-command' in trioflow"),
        ("trioflow run examples.no_such_module:app", "no module named"),
        ("trioflow run examples.served_app:nothing", "has no attribute 'nothing'"),
        ("trioflow status", "exit status 3"),
    ],
)
def test_a_wrong_command_fails(line: str, failure: str, tmp_path: Path, server: Server) -> None:
    block = Block(path="d.md", line=1, language="sh", text=line + "\n", before="", closed=True)
    with pytest.raises(pytest.fail.Exception, match=rf"(?s)^d\.md:2: `[^`]+`: .*{failure}"):
        run_shell(block, Context(tmp_path, server))


def test_a_profiled_command_is_tested_and_its_profile_noted(tmp_path: Path, server: Server) -> None:
    text = (
        "python -m cProfile -o run.prof -m benchmarks run fanout --events 100 --repeat 1\n"
        "python -m pstats run.prof\n"
    )
    block = Block(path="d.md", line=1, language="sh", text=text, before="", closed=True)
    run_shell(block, Context(tmp_path, server))
    wrong = attrs.evolve(block, text=text.replace("--repeat 1", "--repeat 0"))
    with pytest.raises(pytest.fail.Exception, match=r"--repeat: must be >= 1"):
        run_shell(wrong, Context(tmp_path, server))


def test_a_block_without_a_known_language_fails(tmp_path: Path, server: Server) -> None:
    block = Block(path="d.md", line=1, language="", text="x\n", before="", closed=True)
    with pytest.raises(pytest.fail.Exception, match=r"tag it with what it is"):
        test_block(block, tmp_path, server)


def test_a_mermaid_block_must_name_a_diagram_type(tmp_path: Path, server: Server) -> None:
    block = Block(path="d.md", line=1, language="mermaid", text="A --> B\n", before="", closed=True)
    with pytest.raises(pytest.fail.Exception, match=r"opens with 'A', not a diagram type"):
        check_mermaid(block, Context(tmp_path, server))
    check_mermaid(attrs.evolve(block, text="flowchart LR\n  A --> B\n"), Context(tmp_path, server))


def test_yaml_is_checked_without_pyyaml() -> None:
    check_yaml_shape(
        "# a comment\n"
        "services:\n"
        "  app:\n"
        "    image: 'python:3.11'\n"
        "    command: >\n"
        "      python -m\n"
        "      app: not a key\n"
        "    env:\n"
        "      - TRIOFLOW_STORE=postgresql://db/app\n"
        "      - name: x\n"
        "        value: y\n"
        "---\n"
        "key: a plain value\n"
        "  that continues\n"
    )
    with pytest.raises(ValueError, match="line 2: a tab"):
        check_yaml_shape("a:\n\tb: 1\n")
    with pytest.raises(ValueError, match="line 2: neither"):
        check_yaml_shape("a: 1\nnot yaml at all\n")


@pytest.mark.parametrize(
    ("program", "failure"),
    [
        ("def later() -> None:\n    print(never_defined)\n", r"d\.md:3: Undefined name"),
        ("raise SystemExit(3)\n", r"exit status 3"),
        ("import time\n\nprint('so far', flush=True)\ntime.sleep(600)\n", r"hangs.*\nso far"),
    ],
    ids=["undefined-name", "exit-status", "hang"],
)
def test_a_wrong_program_fails(
    program: str, failure: str, tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.modules[__name__], "TIMEOUT", 5)
    block = Block(path="d.md", line=1, language="python", text=program, before="", closed=True)
    with pytest.raises(pytest.fail.Exception, match=failure):
        run_python(block, Context(tmp_path, server))


def test_a_program_gets_no_postgres_variable_it_is_not_told_to_set(
    tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRIOFLOW_STORE", "memory://")
    monkeypatch.setenv("TRIOFLOW_TEST_POSTGRES_URL", "postgresql://nowhere/test")
    # The names are spelled in pieces: naming one would tell the program to set it.
    program = (
        "import os\n\n"
        "names = ['TRIOFLOW_' + 'STORE', 'TRIOFLOW_' + 'TEST_POSTGRES_URL']\n"
        "assert not [name for name in names if name in os.environ]\n"
    )
    block = Block(path="d.md", line=1, language="python", text=program, before="", closed=True)
    assert not needs_postgres(block)
    run_python(block, Context(tmp_path, server))


@pytest.mark.postgres
def test_a_program_told_to_set_trioflow_store_gets_a_fresh_schema_on_the_test_server(
    tmp_path: Path, server: Server
) -> None:
    program = (
        "import os\n\nimport trio\n\nimport trioflow\n\n"
        "app = trioflow.App()\n\n\n"
        "async def main() -> None:\n"
        "    async with trioflow.open_flow(app) as flow:\n"
        "        assert await flow.publish('t', {}) == 1\n\n\n"
        "assert os.environ['TRIOFLOW_STORE'].startswith('postgresql://')\n"
        "trio.run(main)\n"
    )
    before = "Run it with TRIOFLOW_STORE set to your PostgreSQL database:"
    block = Block(path="d.md", line=1, language="python", text=program, before=before, closed=True)
    assert needs_postgres(block)
    run_python(block, Context(tmp_path, server))
