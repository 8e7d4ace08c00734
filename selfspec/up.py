"""`selfspec up`: answer at once, specialize in the background.

    1. the endpoint starts with what the registry has (on a first run: the base model; `auto`
       answers with it until an expert exists);
    2. the shipped domains missing from the registry are specialized by a child process,
       `nice -n 10 selfspec specialize ... --resume --publish-each`: its own vLLM engine in its
       own process tree (the two engines never share a process), at a lower CPU priority so
       that on 2 cores the server stays responsive, and each expert is published as soon as it
       is ready;
    3. the server hot-adds each published expert (its registry watch, serve/watch.py);
    4. the console shows the child's progress (stage, items, time left) from the
       `<experts>/building.json` it writes, which `/health` and `/v1/models` also report.

Ctrl-C stops both and prints one line: what is kept, and the command that continues.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from core.base_model import BUILTIN, cache_root, resolve_base_model
from core.build_status import clear_build_status, read_build_status
from core.console import console
from core.registry import load_registry
from core.seeds import available_domains, load_domain
from specialize.progress import continue_command, format_progress, kept_summary

# The child's CPU priority: serving answers first, specialization takes the idle cycles.
NICENESS = 10
# How long a child gets to exit after SIGINT before its process group is killed. Its files are
# written per batch, so a kill loses one batch at most; a vLLM engine caught mid-start can take
# minutes to notice (seen on a loaded 2-core machine), and the user is waiting.
CHILD_GRACE_S = 20.0
POLL_S = 1.0


def specialize_command(domains: list[str], experts_dir: Path, base_model: str,
                       dtype: str | None = None, verbose: bool = False) -> list[str]:
    """The child's command line (CPU-sized defaults: those of `selfspec specialize`)."""
    cmd = [sys.executable, "-m", "selfspec.cli"] + (["-v"] if verbose else []) + [
        "specialize", *domains, "--experts-dir", str(experts_dir), "--base-model", base_model,
        "--resume", "--publish-each"]
    if dtype:
        cmd += ["--dtype", dtype]
    nice = shutil.which("nice")
    return [nice, "-n", str(NICENESS), *cmd] if nice else cmd


def start_specialize(cmd: list[str], log_file: Path | None) -> subprocess.Popen:
    """The child writes everything to our descriptor 2 (the log file, or the terminal when
    output is not routed); with `log_file`, its engines' output goes straight into that file."""
    env = dict(os.environ)
    if log_file is not None:
        env["SELFSPEC_LOG_FILE"] = str(log_file)
    # Own session: the terminal's Ctrl-C reaches only us, and we stop the child in order
    # (SIGINT, time to save, then its whole process group), engine processes included.
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=2, stderr=None, env=env,
                            start_new_session=True)


def stop_child(child: subprocess.Popen, grace_s: float = CHILD_GRACE_S) -> int:
    """SIGINT (the child saves what it has and exits), then SIGKILL for its process group."""
    if child.poll() is None:
        try:
            os.killpg(child.pid, signal.SIGINT)
            child.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            pass
    try:
        os.killpg(child.pid, signal.SIGKILL)  # leftovers: an engine core the child lost
    except (ProcessLookupError, PermissionError):
        pass
    return child.wait()


def served_models(url: str, api_key: str | None) -> list[str] | None:
    req = urllib.request.Request(f"{url}/v1/models", headers={"Authorization":
                                                              f"Bearer {api_key}"}
                                 if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return [m["id"] for m in json.loads(r.read())["data"]]
    except (OSError, ValueError, KeyError):
        return None


def run_up(args, cfg, host: str, port: int, name: str, prefix: str) -> int:
    from serve.cli import _health, ready_message, start_serving
    wanted = args.domains or available_domains()
    for d in wanted:
        load_domain(d)  # an unknown domain or a broken seed file fails now, not in the child
    registry = load_registry(cfg.experts_dir)
    missing = [d for d in wanted if d not in registry.experts]
    argv = list(getattr(args, "argv", None) or sys.argv[1:])
    console.interrupt_message = lambda: (
        f"interrupted: {kept_summary(cfg.experts_dir, wanted)}; continue with: "
        f"{continue_command(argv, flag=None)}")
    if args.base_model in BUILTIN and not (cache_root() / args.base_model / "config.json"
                                           ).is_file():
        with console.spinner(f"converting the base model {args.base_model} (first run only)"):
            resolve_base_model(args.base_model)

    if cfg.base_model is None and not registry.experts:
        # Nothing in the registry names the base yet: serve the one the experts will be made of.
        cfg = cfg.model_copy(update={"base_model": args.base_model})
    server = None
    if not args.no_serve:
        server = start_serving(cfg, host, port, name, prefix, args.verbose,
                               len(registry.experts))
        if server.url is None:
            server.stop()
            return 1
    child, rc = None, 0
    try:
        if server is not None:
            key = cfg.resolved_api_key()
            print(ready_message(server.url, registry, key, _health(server.url, key),
                                building=missing), flush=True)
            console.quiet_stdout()
        if not missing:
            console.say(f"registry {cfg.experts_dir} already has {', '.join(wanted)}")
        else:
            console.say(f"specializing {', '.join(missing)} into {cfg.experts_dir} in the "
                        f"background (nice {NICENESS}; about 6-12 minutes per domain on 2 CPU "
                        "cores)")
            # Verbose: the child tees its own log to our descriptor 2, like ours.
            child = start_specialize(specialize_command(
                missing, cfg.experts_dir, args.base_model, getattr(args, "dtype", None),
                args.verbose), None if args.verbose else console.log_path)
            rc = watch_child(child, cfg, server.url if server else None, missing)
            child = None
        if server is None:
            return rc
        while True:
            time.sleep(3600)
    finally:
        if child is not None:
            console.end_status()
            stop_child(child)
            clear_build_status(cfg.experts_dir)  # a killed child could not: nothing is coming
        if server is not None:
            server.stop()


def watch_child(child: subprocess.Popen, cfg, url: str | None, domains: list[str]) -> int:
    """Progress on the console until the child ends; one line per expert the server gains."""
    announced: set[str] = set()
    last_check = 0.0
    while child.poll() is None:
        status = read_build_status(cfg.experts_dir)
        line = format_progress(status)
        if line:
            console.status(line, key=tuple((n, d.stage) for n, d in status.domains.items()
                                           if d.state == "running"))
        if url and time.monotonic() - last_check > 5:
            last_check = time.monotonic()
            for expert in set(served_models(url, cfg.api_key) or ()) & set(domains) - announced:
                announced.add(expert)
                console.say(f"now serving {expert}: model='{expert}', and auto routes to it")
        time.sleep(POLL_S)
    console.end_status()
    rc = child.returncode
    if rc == 0:
        console.say(f"all experts made: {', '.join(domains)}" + (
            " (the server picks up the last one within seconds)" if url else ""))
    else:
        console.say(f"selfspec: specialization stopped with exit {rc} (the reason is in "
                    f"{console.log_path or 'the output above'}); "
                    + ("the server keeps serving what it has; " if url else "")
                    + "run `selfspec up` again to continue")
    return 0 if rc == 0 else 1
