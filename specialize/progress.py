"""Progress of a `selfspec specialize` run, per domain: stage, items, time left.

The pipeline itself reports nothing new: a background thread reads what it already leaves
behind - each work dir's `state.json` (finished stages), the live tqdm bars of the stage in
flight (items done, total, rate) and the registry (what got published) - every couple of
seconds. It keeps one console line current and writes `<experts>/building.json`
(core/build_status.py) for the server and for `selfspec up`.
"""

from __future__ import annotations

import json
import logging
import shlex
import threading
import time
from pathlib import Path

from core.build_status import (
    BuildStatus,
    DomainProgress,
    clear_build_status,
    write_build_status,
)
from core.console import Console, format_seconds
from core.registry import load_registry

log = logging.getLogger(__name__)

# In the order the pipeline runs them for one domain (round 2's stages follow round 1's).
STAGES = ("generate", "filter", "queries", "respond", "respond_filter", "train", "validate_train",
          "respond2", "respond2_filter", "train2", "validate_train2", "publish")
LABELS = {"generate": "instructions", "filter": "filtering instructions",
          "queries": "writing routing queries", "respond": "answers",
          "respond_filter": "filtering answers", "train": "training", "validate_train":
          "validating", "respond2": "answers (round 2)", "respond2_filter": "filtering answers",
          "train2": "training (round 2)", "validate_train2": "validating", "publish":
          "publishing", "engine start": "starting the engine"}
# Stages that need the vLLM engine: with no bar yet, the engine is still starting.
ENGINE_STAGES = ("generate", "respond", "respond2")


def next_stage(done: dict, rounds: int = 1, queries: bool = False) -> str:
    """The stage a domain's work dir is at; `queries`: stage 2b runs (`router_queries` > 0)."""
    order = [s for s in STAGES if (rounds == 2 or not s.startswith(("respond2", "train2",
                                                                    "validate_train2")))
             and (queries or s != "queries")]
    return next((s for s in order if s not in done), "publish")


def bar_stage(desc: str, domain: str) -> str | None:
    """The stage a tqdm bar of the pipeline belongs to, from its description (generate.py,
    respond.py, train.py); None for another domain's bar or a third-party one."""
    desc = desc.rstrip(": ")
    if desc == f"{domain}: instructions":
        return "generate"
    if desc == f"{domain}: responses":
        return "respond"
    if desc == f"{domain}: responses (r2)":
        return "respond2"
    if desc == f"train {domain}":
        return "train"
    return None


def live_bars() -> list[dict]:
    """desc, n, total, rate of every open tqdm bar in this process."""
    from tqdm import tqdm

    for _ in range(3):  # the set may change while we read it (a bar opened or closed)
        try:
            bars = list(tqdm._instances)
            break
        except RuntimeError:
            time.sleep(0.01)
    else:
        return []
    out = []
    for b in bars:
        if getattr(b, "disable", False):
            continue
        try:
            fd = b.format_dict
        except Exception:  # noqa: BLE001, S112 - a bar closing under us: skip it this round
            continue
        out.append({"desc": str(fd.get("prefix") or b.desc or ""), "n": int(b.n),
                    "total": int(b.total) if b.total else None, "rate": fd.get("rate")})
    return out


class ProgressMonitor:
    """`with ProgressMonitor(...)`: a thread refreshes the status every `interval_s`; the file
    is removed at the end, whatever the outcome (nothing is being made any more)."""

    def __init__(self, experts_dir: Path, domains: list[str], console: Console,
                 rounds: int = 1, interval_s: float = 2.0, bars=live_bars,
                 queries: bool = False):
        self.experts_dir, self.domains, self.console = Path(experts_dir), list(domains), console
        self.rounds, self.interval_s, self.bars = rounds, interval_s, bars
        self.queries = queries  # stage 2b runs: it has no bar, and is not an engine start
        self.versions = self._versions()  # published before this run: not ours
        self._since: dict[str, tuple[str, float]] = {}  # domain -> (stage, when it was seen first)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _versions(self) -> dict[str, int]:
        try:
            return {n: e.version for n, e in load_registry(self.experts_dir).experts.items()}
        except Exception:  # noqa: BLE001 - progress must never fail the run
            return {}

    def snapshot(self, now: float | None = None) -> BuildStatus:
        now = time.monotonic() if now is None else now
        versions, bars = self._versions(), self.bars()
        status = BuildStatus()
        # The first unfinished domain without a bar is the one being worked on (a filter, the
        # engine starting); others without a bar wait for their turn.
        first = True
        any_bar = any(bar_stage(b["desc"], d) for b in bars for d in self.domains)
        for name in self.domains:
            if name in versions and versions[name] != self.versions.get(name):
                status.domains[name] = DomainProgress(state="published")
                continue
            done = _read_done(self.experts_dir / ".work" / name)
            stage = next_stage(done or {}, self.rounds, self.queries)
            bar = next((b for b in bars if bar_stage(b["desc"], name) in
                        (stage, stage.rstrip("2"))), None)
            active = bar is not None or (first and not any_bar)
            first = False
            if not active:
                status.domains[name] = DomainProgress(
                    state="queued", stage=None if done is None else stage)
                continue
            if bar is None and stage in ENGINE_STAGES:
                stage = "engine start"
            seen_stage, since = self._since.get(name, (None, now))
            if seen_stage != stage:
                since = now
                self._since[name] = (stage, now)
            p = DomainProgress(state="running", stage=stage, elapsed_s=round(now - since, 1))
            if bar is not None:
                p.done, p.total = bar["n"], bar["total"]
                if bar["rate"] and p.total:
                    p.eta_s = round(max(0, p.total - p.done) / bar["rate"], 1)
            status.domains[name] = p
        return status

    def refresh(self) -> BuildStatus:
        status = self.snapshot()
        try:
            write_build_status(self.experts_dir, status)
        except OSError:
            pass  # a read-only or full disk must not stop the run; the console still shows it
        line = format_progress(status)
        if line:
            running = [(n, d.stage) for n, d in status.domains.items() if d.state == "running"]
            self.console.status(line, key=tuple(running))
        return status

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.refresh()
            except Exception:  # progress must never fail the run
                log.debug("progress refresh failed", exc_info=True)

    def __enter__(self):
        # The first refresh waits one interval: bad input fails in milliseconds, and its one
        # error line must not follow a progress line (or leave a status file behind).
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.console.end_status()
        try:
            clear_build_status(self.experts_dir)
        except OSError:
            pass  # no experts dir (the run was refused): nothing to clear


def _read_done(workdir: Path) -> dict | None:
    """The work dir's finished stages; None when there is no work dir (not started)."""
    try:
        return json.loads((workdir / "state.json").read_text()).get("done", {})
    except (OSError, ValueError):
        return None


def format_domain(name: str, p: DomainProgress) -> str:
    label = LABELS.get(p.stage or "", p.stage or "")
    if p.done is not None and p.total:
        left = f", {format_seconds(p.eta_s)} left" if p.eta_s is not None else ""
        return f"{name}: {label} {p.done}/{p.total}{left}"
    return f"{name}: {label} ({format_seconds(p.elapsed_s)})"


def format_progress(status: BuildStatus | None) -> str:
    """One console line: the running domains in full, then the others by state."""
    if status is None or not status.domains:
        return ""
    parts = [format_domain(n, d) for n, d in status.domains.items() if d.state == "running"]
    for state, word in (("queued", "next"), ("published", "ready"), ("failed", "failed")):
        names = [n for n, d in status.domains.items() if d.state == state]
        if names:
            parts.append(f"{word}: {', '.join(names)}")
    return " | ".join(parts)


def kept_summary(experts_dir: Path, domains: list[str]) -> str:
    """What an interrupted run leaves behind, for the one line Ctrl-C prints."""
    experts_dir = Path(experts_dir)
    try:
        published = set(load_registry(experts_dir).experts)
    except Exception:  # noqa: BLE001 - an unreadable registry: say what the work dirs hold
        published = set()
    ready, partial = [], []
    for name in domains:
        workdir = experts_dir / ".work" / name
        done = _read_done(workdir)
        if done is None:
            if name in published:
                ready.append(name)
            continue
        stage = next_stage(done)
        files = {"generate": ("generate/instructions.jsonl", "candidate instructions"),
                 "respond": ("respond/responses.jsonl", "answers"),
                 "respond2": ("respond2/responses.jsonl", "answers (round 2)")}
        path, noun = files.get(stage, (None, ""))
        count = _count_lines(workdir / path) if path else 0
        what = f"{count} {noun}" if count else f"at {LABELS[stage]}"
        partial.append(f"{name} ({what})")
    bits = []
    if ready:
        bits.append(f"experts {', '.join(ready)} in {experts_dir}")
    if partial:
        bits.append(f"the work on {', '.join(partial)} in {experts_dir / '.work'}")
    return "kept " + " and ".join(bits) if bits else "nothing to keep yet"


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return 0


def continue_command(argv: list[str], flag: str | None = "--resume") -> str:
    """The command line that picks up where this one stopped."""
    args = [a for a in argv if a != "--restart"]
    if flag and flag not in args:
        args.append(flag)
    return "selfspec " + " ".join(shlex.quote(a) for a in args)
