"""``%%sandbox``, ``%sandbox`` and ``%sandbox_ssh``."""

from __future__ import annotations

import argparse
import functools
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from .._durations import DURATION_FORMS, format_size, parse_duration, parse_size
from .._errors import CommandError, SandboxError, SandboxExpired, SandboxFailed, SandboxNotFound
from ..client import AsyncSandbox, Sandbox
from . import _background, _text
from ._sandboxes import KernelSandboxes, SandboxOptions

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT = "default"


# -- argument parsing ---------------------------------------------------------------------


class _HelpShown(Exception):
    """``-h`` was given: the help is printed, nothing else is done."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as IPython usage errors instead of exiting."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault(
            "formatter_class", lambda prog: argparse.RawDescriptionHelpFormatter(prog, width=88)
        )
        super().__init__(**kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.format_usage().strip()}\n{self.prog}: error: {message}")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise _HelpShown

    def parse(self, line: str) -> argparse.Namespace:
        try:
            return self.parse_args(shlex.split(line))
        except ValueError as e:  # unbalanced quotes
            self.error(str(e))


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _duration(text: str) -> str:
    if text != "session":
        try:
            parse_duration(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {DURATION_FORMS}") from None
    return text


def _size(text: str) -> str:
    try:
        parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _cpus(text: str) -> float:
    try:
        cpus = float(text)
    except ValueError:
        cpus = math.nan
    if not 0 < cpus < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive number of CPUs, got {text!r}")
    return cpus


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number of 0 or more, got {text!r}")
    return int(text)


def _cell_parser() -> _Parser:
    p = _Parser(
        prog="%%sandbox",
        description=(
            "Run the cell as a bash script in sandbox NAME, streaming its output.\n\n"
            "The sandbox is created on first use with the options given; later cells may\n"
            "repeat them but not change them. A non-zero exit is an error in the cell;\n"
            "interrupting the kernel stops the command and keeps the sandbox.\n"
            "Names are local to the kernel (the service calls it NAME-<kernel id prefix>).\n"
            "See also %sandbox? (manage sandboxes) and %sandbox_ssh? (SSH into one)."
        ),
        epilog=CELL_EXAMPLES,
    )
    p.add_argument(
        "name",
        nargs="?",
        default=DEFAULT,
        metavar="NAME",
        help=f'sandbox name (default "{DEFAULT}")',
    )
    p.add_argument(
        "--timeout",
        type=_duration,
        metavar="T",
        help=(
            'lifetime: "session" (default: ends with this kernel) or a duration like "30m"'
            " (outlives the kernel; find it again with %%sandbox connect)"
        ),
    )
    p.add_argument("--memory", type=_size, metavar="M", help='memory limit, e.g. "512M", "2G"')
    p.add_argument("--cpus", type=_cpus, metavar="N", help="CPU limit, e.g. 0.5 or 2")
    p.add_argument(
        "--network", choices=("none", "host"), help="none (default: loopback only) or host"
    )
    p.add_argument(
        "--record-terminals",
        action="store_const",
        const=True,
        help="record its SSH terminal sessions (users are told at login)",
    )
    p.add_argument(
        "--env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="K=V",
        help="environment variable for the script (and for the sandbox when "
        "this cell creates it); repeatable",
    )
    p.add_argument(
        "--image",
        metavar="DIR",
        help=(
            "copy local directory DIR into the sandbox's home before the script runs (a plain "
            "directory upload, not a container image)"
        ),
    )
    p.add_argument(
        "--bg",
        action="store_true",
        help=(
            "start the script in the background and return at once; its output goes to the "
            "sandbox log (%%sandbox logs NAME, or the %%sandbox_ssh widget)"
        ),
    )
    return p


def _line_parser() -> _Parser:
    p = _Parser(
        prog="%sandbox",
        description=(
            "Manage this kernel's sandboxes. NAME is a local name (as in %%sandbox NAME), or a\n"
            "sandbox id or service name from `%sandbox list`.\n\n"
            "Run a cell in a sandbox with %%sandbox [NAME] (see %%sandbox?); open SSH into one,\n"
            "with a live widget, with %sandbox_ssh [NAME] (see %sandbox_ssh?)."
        ),
        epilog=LINE_EXAMPLES,
    )
    commands = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str, *args: tuple[str, dict[str, Any]]) -> None:
        sub = commands.add_parser(name, help=help, description=help.replace("%%", "%"))
        for arg, options in args:
            sub.add_argument(arg, **options)

    name_opt = (
        "name",
        {
            "nargs": "?",
            "default": DEFAULT,
            "metavar": "NAME",
            "help": f'sandbox (default "{DEFAULT}")',
        },
    )
    into = (
        "--sandbox",
        {
            "default": DEFAULT,
            "metavar": "NAME",
            "help": f'sandbox (default "{DEFAULT}", created on first use)',
        },
    )
    command(
        "list",
        "list the service's sandboxes",
        ("--all", {"action": "store_true", "help": "include ended sandboxes"}),
    )
    command(
        "kill",
        "end a sandbox now (its files are deleted)",
        ("name", {"nargs": "?", "metavar": "NAME"}),
        (
            "--all",
            {
                "action": "store_true",
                "help": "end all your running sandboxes, those of other notebooks too",
            },
        ),
    )
    command(
        "revoke",
        "revoke a sandbox's SSH credentials; its SSH sessions close, the sandbox keeps running",
        name_opt,
    )
    command(
        "restart",
        "start a failed sandbox again, with its files, limits and deadline",
        ("name", {"metavar": "NAME"}),
    )
    command(
        "connect",
        "use an existing sandbox (from another kernel, or a duration sandbox "
        "from before a restart) under a local name",
        ("ref", {"metavar": "ID"}),
        (
            "name",
            {
                "nargs": "?",
                "metavar": "NAME",
                "help": "local name (default: the sandbox's service name)",
            },
        ),
    )
    command(
        "extend",
        "set a sandbox's deadline to T from now (a session sandbox then outlives the kernel)",
        ("name", {"metavar": "NAME"}),
        ("timeout", {"type": _duration, "metavar": "T"}),
    )
    command(
        "logs",
        "show a sandbox's log: background output and events",
        name_opt,
        (
            "--tail",
            {
                "type": _count,
                "default": 100,
                "metavar": "N",
                "help": "last N entries (default 100)",
            },
        ),
        ("--follow", {"action": "store_true", "help": "keep following until interrupted"}),
    )
    command(
        "upload",
        "copy a local file or directory into a sandbox",
        into,
        ("src", {"metavar": "SRC"}),
        ("dst", {"metavar": "DST"}),
    )
    command(
        "download",
        "copy a file or directory out of a sandbox",
        into,
        ("src", {"metavar": "SRC"}),
        ("dst", {"metavar": "DST"}),
    )
    command("info", "status, lifetime, limits and usage of a sandbox", name_opt)
    command(
        "get", "return the Sandbox object: sb = %%sandbox get NAME (created on first use)", name_opt
    )
    return p


def _ssh_parser() -> _Parser:
    p = _Parser(
        prog="%sandbox_ssh",
        description=(
            "Expose SSH into sandbox NAME and show a live widget: the ssh command with a Copy\n"
            "button, the host key, the time left, live logs, and Kill, Extend and Revoke\n"
            "buttons. The token (the ssh user name) is hidden in everything saved into the\n"
            "notebook; without a widget front end the output is plain text.\n\n"
            f'Without NAME it is sandbox "{DEFAULT}", created on first use (as by a bare\n'
            "%%sandbox). A NAME must exist already (made by %%sandbox NAME, or an id or name\n"
            "from %sandbox list); --new NAME creates it. See also %sandbox? and %%sandbox?."
        ),
        epilog=SSH_EXAMPLES,
    )
    p.add_argument(
        "name", nargs="?", metavar="NAME", help=f'an existing sandbox (default "{DEFAULT}")'
    )
    p.add_argument(
        "--new", action="store_true", help="create sandbox NAME if it does not exist yet"
    )
    p.add_argument(
        "--ttl",
        type=_duration,
        metavar="T",
        help="the credential expires after T (default: with the sandbox)",
    )
    p.add_argument(
        "--single-use", action="store_true", help="the credential allows one connection only"
    )
    return p


CELL_EXAMPLES = """\
examples:
  %%sandbox
  echo hello; uname -a            # in sandbox "default", made on first use

  %%sandbox web --memory 512M --cpus 1 --timeout 30m
  make test                       # a named sandbox with limits; it outlives the kernel

  %%sandbox web --bg
  python3 -m http.server 8000     # in the background; its output: %sandbox logs web

  %%sandbox --image ./site --env MODE=test
  ls; echo $MODE                  # ./site is copied into the home first
"""

LINE_EXAMPLES = """\
examples:
  %sandbox list                   the running sandboxes (--all: ended ones too)
  %sandbox info web               status, lifetime, limits and usage
  %sandbox logs web --follow      follow the background output until interrupted
  %sandbox upload data.csv data.csv --sandbox web
  %sandbox download results out/ --sandbox web
  %sandbox extend web 1h          the deadline is now 1 hour from now
  %sandbox revoke web             SSH credentials stop working; the sandbox runs on
  %sandbox restart web            start a failed sandbox again, with its files
  %sandbox connect sb-1a2b3c4d4e theirs     use another kernel's sandbox as "theirs"
  sb = %sandbox get web           the Sandbox object, for sb.sh("ls"), sb.fs, ...
  %sandbox kill web               end it now; --all ends all your sandboxes
"""

SSH_EXAMPLES = """\
examples:
  %sandbox_ssh                    SSH into sandbox "default" (made on first use)
  %sandbox_ssh web --ttl 1h       a credential for the existing sandbox "web", for 1 hour
  %sandbox_ssh --new lab          create sandbox "lab" and SSH into it
  %sandbox_ssh web --single-use   the credential allows one connection only

Copy the command from the widget; `%sandbox revoke web` ends every credential.
"""


def _full_help(parser: _Parser) -> str:
    """The parser's help followed by each subcommand's usage and help."""
    parts = [parser.format_help()]
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        for sub in action.choices.values():
            parts.append(sub.format_help())
    return "\n".join(parts)


CELL_PARSER, LINE_PARSER, SSH_PARSER = _cell_parser(), _line_parser(), _ssh_parser()


# -- errors and output ------------------------------------------------------------------


def _files_kept(sandbox: Sandbox) -> bool:
    """Are the files of a sandbox that just failed still there? (Yes, if it cannot tell.)"""
    try:
        return sandbox.info().files_kept
    except SandboxError:
        return True


def _concise(error: BaseException, text: str | None = None) -> BaseException:
    """Make IPython show `error` as one message (`text`, else its type and message),
    without a Python traceback."""
    text = text or f"{type(error).__name__}: {error}"
    error._render_traceback_ = lambda: text.splitlines()  # type: ignore[attr-defined]
    return error


def _magic(parser: _Parser) -> Callable[[F], F]:
    """Document a magic with `parser`'s help, and show service errors concisely."""

    def decorate(method: F) -> F:
        @functools.wraps(method)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            except _HelpShown:
                return None
            except SandboxError as e:
                raise _concise(e) from None
            except KeyboardInterrupt as e:
                if not hasattr(e, "_render_traceback_"):
                    _concise(e, "interrupted: the magic was stopped")
                raise e.with_traceback(None) from None

        wrapper.__doc__ = _full_help(parser)
        return wrapper  # type: ignore[return-value]

    return decorate


class _Output:
    """Writes command output to stdout/stderr as it comes, flushing often enough to look live.

    Its methods are called on the client's thread while the main thread waits; the
    kernel routes output from other threads to the cell being executed.
    """

    FLUSH_EVERY = 0.05

    def __init__(self) -> None:
        self.last_flush = 0.0

    def stdout(self, text: str) -> None:
        self._write(sys.stdout, text)

    def stderr(self, text: str) -> None:
        self._write(sys.stderr, text)

    def _write(self, stream: Any, text: str) -> None:
        stream.write(text)
        now = time.monotonic()
        if now - self.last_flush > self.FLUSH_EVERY:
            stream.flush()
            self.last_flush = now

    @staticmethod
    def flush() -> None:
        sys.stdout.flush()
        sys.stderr.flush()


# -- the magics -------------------------------------------------------------------------


@magics_class
class SandboxMagics(Magics):
    """Run cells in sandboxes and manage the sandboxes of this kernel."""

    def __init__(self, shell: Any, sandboxes: KernelSandboxes) -> None:
        super().__init__(shell)
        self.sandboxes = sandboxes

    @property
    def _in_kernel(self) -> bool:
        return getattr(self.shell, "kernel", None) is not None

    @cell_magic("sandbox")
    @_magic(CELL_PARSER)
    def sandbox_cell(self, line: str, cell: str) -> None:
        args = CELL_PARSER.parse(line)
        env = dict(args.env)
        options = SandboxOptions(
            timeout=args.timeout,
            memory=args.memory,
            cpus=args.cpus,
            network=args.network,
            env=env,
            record_terminals=args.record_terminals,
        )
        sandbox = self.sandboxes.open(args.name, options)
        if args.image:
            self._transfer(sandbox, "upload", args.image, ".", report=False)
        script = "exec bash -c " + shlex.quote(cell.rstrip("\n"))
        try:
            if args.bg:
                process = sandbox.spawn(script, env=env or None)
                print(
                    f"started pid {process.pid} in sandbox {args.name!r}; its output goes "
                    f"to the sandbox log (`%sandbox logs {args.name}`)"
                )
                return
            output = _Output()
            try:
                sandbox.sh(
                    script, env=env or None, on_stdout=output.stdout, on_stderr=output.stderr
                )
            finally:
                output.flush()
        except CommandError as e:
            code = e.result.exit_code if e.result else "?"
            raise _concise(
                CommandError(
                    f"the script exited with code {code} in sandbox {args.name!r}", e.result
                )
            ) from None
        except SandboxFailed as e:
            name = args.name
            download = f"`%sandbox download --sandbox {name} SRC DST`, "
            raise _concise(
                SandboxFailed(
                    f"{e} (here: {download if _files_kept(sandbox) else ''}"
                    f"`%sandbox restart {name}` or `%sandbox kill {name}`)"
                )
            ) from None
        except (SandboxExpired, SandboxNotFound) as e:
            self.sandboxes.forget(sandbox.id)
            raise _concise(
                type(e)(
                    f"sandbox {args.name!r} has ended ({e}); run the cell again to start a new one"
                )
            ) from None
        except KeyboardInterrupt as e:
            raise _concise(
                e, f"interrupted: the command was stopped; sandbox {args.name!r} is still running"
            ) from None

    @line_magic("sandbox")
    @_magic(LINE_PARSER)
    def sandbox_line(self, line: str) -> Sandbox | None:
        if not line.strip():
            print(_full_help(LINE_PARSER))
            return None
        args = LINE_PARSER.parse(line)
        return getattr(self, f"_{args.command}")(args)

    @line_magic("sandbox_ssh")
    @_magic(SSH_PARSER)
    def sandbox_ssh(self, line: str) -> None:
        args = SSH_PARSER.parse(line)
        if args.name is None or args.new:
            name = args.name or DEFAULT
            sandbox = self.sandboxes.open(name)
        else:
            name = args.name
            sandbox = self.sandboxes.find(name, to_create=f"%sandbox_ssh --new {name}")
        access = sandbox.expose_ssh(ttl=args.ttl, single_use=args.single_use)
        widget = None
        if self._in_kernel and not os.environ.get("NBGRADER_EXECUTION"):
            try:
                from .widget import SshWidget
            except ImportError:  # anywidget is not installed: plain text
                pass
            else:
                widget = SshWidget(sandbox, name, access, self.sandboxes)
        if widget is not None:
            from IPython.display import display

            display(widget, metadata=SshWidget.OUTPUT_METADATA)
        else:
            # Terminal IPython saves no output: there the command is shown in full.
            print(_text.ssh_text(name, sandbox.info(), access, reveal=not self._in_kernel))

    # -- %sandbox subcommands -------------------------------------------------------------

    def _list(self, args: argparse.Namespace) -> None:
        names = self.sandboxes.names()
        infos = Sandbox.list(include_ended=args.all)
        if not infos:
            print("no sandboxes")
            return
        rows = [
            [
                names.get(i.id, ""),
                i.id,
                i.name,
                i.status,
                _text.state(i),
                "this kernel" if self.sandboxes.owns(i.id) else i.owner,
            ]
            for i in infos
        ]
        header = ["NAME", "ID", "SERVICE NAME", "STATUS", "LIFETIME / REASON", "OWNER"]
        print(_text.table(rows, header))

    def _kill(self, args: argparse.Namespace) -> None:
        if args.all == (args.name is not None):
            raise UsageError("name the sandbox to kill (`%sandbox kill NAME`), or use --all")
        if not args.all:
            self.sandboxes.kill(self.sandboxes.find(args.name))
            print(f"killed sandbox {args.name!r}")
            return
        names = self.sandboxes.names()
        mine = Sandbox.list(mine=True)
        for info in mine:
            local = names.get(info.id)
            shown = f"sandbox {local!r} ({info.id})" if local else info.id
            try:
                self.sandboxes.kill(Sandbox.connect(info.id))
            except (SandboxExpired, SandboxNotFound):
                print(f"{shown} had ended already")
            else:
                print(f"killed {shown}")
            self.sandboxes.forget(info.id)
        if not mine:
            print("no running sandboxes to kill")

    def _revoke(self, args: argparse.Namespace) -> None:
        count = self.sandboxes.revoke_ssh(self.sandboxes.find(args.name))
        print(
            f"revoked {count} SSH credential{'' if count == 1 else 's'} of sandbox "
            f"{args.name!r}; it keeps running (`%sandbox_ssh {args.name}` makes a new one)"
        )

    def _restart(self, args: argparse.Namespace) -> None:
        info = self.sandboxes.find(args.name).restart()
        print(f"sandbox {args.name!r} ({info.id}) is running again, with its files")

    def _connect(self, args: argparse.Namespace) -> None:
        name, sandbox = self.sandboxes.connect(args.ref, args.name)
        print(
            f"sandbox {sandbox.id} is now {name!r} here (`%%sandbox {name}`); "
            "it is not ended with this kernel"
        )

    def _extend(self, args: argparse.Namespace) -> None:
        sandbox = self.sandboxes.find(args.name)
        info = sandbox.extend_timeout(args.timeout)
        self.sandboxes.disown(sandbox.id)
        if self.sandboxes.owns(sandbox.id):
            ending = "it still ends with this kernel, as every sandbox does under nbgrader"
        else:
            ending = "it no longer ends with this kernel"
        print(f"sandbox {args.name!r}: {_text.lifetime(info)}; {ending}")

    def _logs(self, args: argparse.Namespace) -> None:
        sandbox = self.sandboxes.find(args.name)
        output = _Output()

        async def show() -> None:
            inner = await AsyncSandbox.connect(sandbox.id)
            async for entry in inner.logs(follow=args.follow, tail=args.tail):
                if entry.stream == "stderr":
                    output.stderr(entry.line() + "\n")
                else:
                    output.stdout(entry.line() + "\n")

        try:
            _background.wait(show())
        except KeyboardInterrupt:
            if not args.follow:
                raise
        finally:
            output.flush()

    def _upload(self, args: argparse.Namespace) -> None:
        self._transfer(self.sandboxes.open(args.sandbox), "upload", args.src, args.dst)

    def _download(self, args: argparse.Namespace) -> None:
        self._transfer(self.sandboxes.open(args.sandbox), "download", args.src, args.dst)

    def _info(self, args: argparse.Namespace) -> None:
        print(_text.info_text(args.name, self.sandboxes.find(args.name).info()))

    def _get(self, args: argparse.Namespace) -> Sandbox:
        return self.sandboxes.open(args.name)

    def _transfer(
        self, sandbox: Sandbox, direction: str, src: str, dst: str, report: bool = True
    ) -> None:
        """Upload or download with a progress bar, on the background loop (Ctrl-C stops it)."""
        progress = _text.TransferProgress(f"{direction} {src} -> {dst}", self._in_kernel)

        async def run() -> None:
            inner = await AsyncSandbox.connect(sandbox.id)
            operation = inner.fs.upload if direction == "upload" else inner.fs.download
            await operation(src, dst, progress=progress.update)

        try:
            _background.wait(run(), tick=progress.draw)
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
        progress.finish()
        if report:
            size = format_size(_local_size(Path(src if direction == "upload" else dst)))
            print(f"{direction}ed {src} -> {dst} ({size})")


def _local_size(path: Path) -> int:
    """The bytes a local file holds, or all the regular files under a directory."""
    if not path.is_dir():
        return path.lstat().st_size
    return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
