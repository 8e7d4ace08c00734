"""What the user sees, apart from what the engines say.

`route_output()` sends everything written to file descriptor 2 into a log file: vLLM, Ray,
Triton and torch warnings, tqdm bars of third-party code, and the tracebacks of child processes
(vLLM's engine core prints one when Ctrl-C reaches it). Child processes inherit descriptor 2, so
this catches what no Python logging setting can. The console keeps a copy of the terminal's
descriptor and shows only our own lines: progress, spinners, errors. `--verbose` tees the log
back to the terminal instead; the log file is written either way and its path is printed.

`Console.spinner(name)` shows a long step's name and elapsed time; `Console.status(line)` keeps
one progress line current (rewritten in place on a terminal, printed on change otherwise).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TextIO

OUR_PACKAGES = ("specialize", "serve", "router", "evaluation")
# Off a terminal (CI, `make up > log`), a status line is printed on change or this often.
PLAIN_EVERY_S = 30.0


def format_seconds(s: float | None) -> str:
    if s is None:
        return "?"
    s = max(0, round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Console:
    def __init__(self, stream: TextIO | None = None, tty: bool | None = None):
        self._stream, self._tty = stream, tty
        self._lock = threading.Lock()
        self._line = ""  # the status line on screen (tty), or the last one printed (plain)
        self._key = None
        self._printed_at = 0.0
        # Set by a command: the one line printed when Ctrl-C ends it (what is kept, how to go on).
        self.interrupt_message: Callable[[], str] | None = None
        self.interrupted = False
        self.log_path: Path | None = None  # where route_output() sends descriptor 2
        self.verbose = False
        # A line shown just before the console's first other output (the log path): bad input
        # that fails before anything runs then ends in its one error line alone.
        self.pending: str | None = None

    def _write_pending(self) -> None:  # under the lock
        if self.pending is not None:
            self.stream.write(self.pending + "\n")
            self.pending = None

    @property
    def stream(self) -> TextIO:
        # Unrouted, the console is whatever sys.stderr is now (pytest swaps it per test).
        return self._stream if self._stream is not None else sys.stderr

    @stream.setter
    def stream(self, stream: TextIO) -> None:
        self._stream = stream

    @property
    def tty(self) -> bool:
        if self._tty is None:
            try:
                return self.stream.isatty()
            except (AttributeError, ValueError):
                return False
        return self._tty

    @tty.setter
    def tty(self, tty: bool | None) -> None:
        self._tty = tty

    def say(self, text: str) -> None:
        """A whole line (or lines); a status line on screen is redrawn below it."""
        with self._lock:
            self._write_pending()
            if self.tty and self._line:
                self.stream.write("\r\x1b[2K")
            self.stream.write(text + "\n")
            if self.tty and self._line:
                self.stream.write(self._line)
            self.stream.flush()

    def status(self, line: str, key: object = None) -> None:
        """Replace the status line. Off a terminal it is printed when `key` (default: the line)
        changes, or every PLAIN_EVERY_S."""
        with self._lock:
            self._write_pending()
            if self.tty:
                self._line = line
                self.stream.write("\r\x1b[2K" + line)
                self.stream.flush()
                return
            key = line if key is None else key
            now = time.monotonic()
            if key != self._key or now - self._printed_at >= PLAIN_EVERY_S:
                self._key, self._printed_at, self._line = key, now, line
                self.stream.write(line + "\n")
                self.stream.flush()

    def quiet_stdout(self) -> None:
        """Once a server printed its ready message, its stdout has nothing more for the user,
        but Ray's driver still prints there (e.g. `(raylet) Task ... failed` at shutdown):
        send descriptor 1 to the log too. Only when routed and not verbose."""
        if self.log_path is None or self.verbose:
            return
        sys.stdout.flush()
        os.dup2(2, 1)

    def end_status(self) -> None:
        with self._lock:
            if self.tty and self._line:
                self.stream.write("\r\x1b[2K")
                self.stream.flush()
            self._line, self._key = "", None

    @contextlib.contextmanager
    def spinner(self, name: str) -> Iterator[None]:
        """`name` and the elapsed time while the block runs, then one line with the time it
        took (or nothing, if it failed: the error says the rest)."""
        started, stop = time.monotonic(), threading.Event()

        def spin() -> None:
            for frame in itertools.cycle("|/-\\"):
                elapsed = format_seconds(time.monotonic() - started)
                self.status(f"{frame} {name} ... {elapsed}", key=name)
                if stop.wait(0.2 if self.tty else 1.0):
                    return

        thread = threading.Thread(target=spin, name="spinner", daemon=True)
        thread.start()
        ok = False
        try:
            yield
            ok = True
        finally:
            stop.set()
            thread.join()
            self.end_status()
            if ok:
                self.say(f"{name}: done in {format_seconds(time.monotonic() - started)}")


console = Console()


def log_dir() -> Path:
    env = os.environ.get("SELFSPEC_LOG_DIR")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "selfspec" / "logs"


def route_output(command: str, verbose: bool) -> Path:
    """Descriptor 2 -> a new log file (tee'd to the terminal when verbose); our console keeps
    the terminal. Python logging: everything to the log; our own warnings also to the console.
    Returns the log file's path."""
    # A child of `selfspec up` writes into its parent's log (one file to read).
    path = Path(os.environ.get("SELFSPEC_LOG_FILE") or log_dir() /
                f"{command}-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log")
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    terminal = os.dup(2)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    if verbose:
        _tee(log_fd, terminal)
    else:
        os.dup2(log_fd, 2)
        os.close(log_fd)
    console.stream = os.fdopen(terminal, "w", buffering=1, encoding="utf-8", errors="replace")
    console.log_path, console.verbose = path, verbose

    # vLLM logs to stdout unless told otherwise; its INFO lines are worth keeping in the log.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "DEBUG" if verbose else "INFO")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info" if verbose else "warning")
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    to_log = logging.StreamHandler(sys.stderr)  # descriptor 2: the log (and the tee)
    to_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(to_log)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        mine = logging.StreamHandler(console.stream)
        mine.setLevel(logging.WARNING)
        mine.addFilter(lambda r: r.name.split(".")[0] in OUR_PACKAGES)
        mine.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(mine)
    logging.captureWarnings(True)  # warnings.warn -> logging -> the log file
    return path


def _tee(log_fd: int, terminal: int) -> None:
    """Descriptor 2 -> a pipe; a thread copies it to the log and the terminal. The write end
    stays open in every child process, so the thread runs until the last of them exits."""
    r, w = os.pipe()
    os.dup2(w, 2)
    os.close(w)

    def copy() -> None:
        while chunk := os.read(r, 65536):
            os.write(log_fd, chunk)
            with contextlib.suppress(OSError):
                os.write(terminal, chunk)

    thread = threading.Thread(target=copy, name="log-tee", daemon=True)
    thread.start()

    def drain() -> None:
        # At exit the daemon thread would die with lines still in the pipe: close our write
        # end and give it a moment (children still running keep theirs open).
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
            os.close(2)
        thread.join(timeout=1.0)

    atexit.register(drain)


def catch_interrupts() -> None:
    """SIGINT and SIGTERM -> KeyboardInterrupt once, with `console.interrupted` set (so a
    command can tell an engine that died of the same Ctrl-C from a real failure). A second one
    while the command cleans up ends the process at once, with the same one line."""

    def handler(signum, frame):
        if console.interrupted:
            console.end_status()
            console.say(interrupt_line())
            os._exit(130)
        console.interrupted = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def interrupt_line() -> str:
    try:
        if console.interrupt_message is not None:
            return console.interrupt_message()
    except Exception as e:  # noqa: BLE001 - the line must come out whatever the state on disk
        return f"interrupted ({e})"
    return "interrupted"
