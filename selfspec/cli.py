"""The `selfspec` command: the verb table, and the one module that imports every half.

Each half builds its own subcommands (specialize/cli.py, router/cli.py, serve/cli.py,
evaluation/cli.py, bench/cli.py). Here they go under one parser, each half gets what it needs
from another as a function (the router index rebuilt after the registry changes, the evaluation
run for `ablate --train-eval`), `selfspec up` joins specialize and serve, and any
`SelfspecError` ends in one readable line with a non-zero exit. Engine logs are quieted so the
progress bars stay readable.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from bench.cli import add_parsers as bench_parsers
from core.console import catch_interrupts, console, interrupt_line, route_output
from core.errors import SelfspecError
from evaluation.cli import add_parsers as eval_parsers
from evaluation.gain import expert_gain
from router.cli import add_parsers as router_parsers
from serve.cli import add_parsers as serve_parsers
from serve.cli import add_serve_flags, cli_api_key, deploy_settings, with_dtype
from specialize.cli import add_parsers as specialize_parsers

log = logging.getLogger(__name__)


def rebuild_router_index(experts_dir: Path) -> None:
    """Publishing changes the experts, so the router index beside the registry is rebuilt now
    (not on the first request). The experts are already published: a failure here only warns,
    and the router rebuilds the stale index itself when it next loads."""
    # router.index pulls in FAISS and the encoder: loaded only when a command changed experts.
    from router.index import ensure_index

    try:
        ensure_index(experts_dir)
    except Exception as e:  # noqa: BLE001 - any encoder/FAISS problem must not undo a publish
        log.warning("router index not rebuilt (%s); `selfspec route` will rebuild it", e)


def _up_parser(sub) -> None:
    u = sub.add_parser("up", help="serve at once, and specialize the shipped domains missing "
                       "from the registry in the background (CPU-sized defaults); each expert "
                       "joins the server when it is published")
    add_serve_flags(u)
    u.add_argument("--domains", nargs="+", metavar="DOMAIN",
                   help="domains to have (default: every shipped domain under seeds/)")
    u.add_argument("--base-model", default="smollm2-135m-instruct")
    u.add_argument("--no-serve", action="store_true", help="specialize only, do not serve")
    u.set_defaults(func=run_up)


def run_up(args) -> int:
    from selfspec.up import run_up as up
    from serve.app import refuse_open_exposure, resolve_config

    settings = deploy_settings(args.config)
    cfg = resolve_config(with_dtype(settings["args"], args.dtype), experts_dir=args.experts_dir,
                         api_key=cli_api_key(args))
    host = args.host or settings["host"] or "127.0.0.1"
    if getattr(args, "insecure_no_auth", False):  # the app builder checks the host again
        cfg = cfg.model_copy(update={"insecure_no_auth": True})
    refuse_open_exposure(host, cfg)
    port = args.port or settings["port"] or 8000
    return up(args, cfg, host, port, settings["name"], settings["route_prefix"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfspec", description="Self-specialized domain "
                                     "experts from one base model, served together.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    sub = parser.add_subparsers(dest="command", required=True)
    specialize_parsers(sub, registry_changed=rebuild_router_index, expert_gain=expert_gain)
    router_parsers(sub)
    serve_parsers(sub)
    _up_parser(sub)
    eval_parsers(sub)
    bench_parsers(sub)
    return parser


# Commands that start engines: their third-party output goes to a log file (core/console.py).
QUIET_COMMANDS = ("specialize", "up", "serve")


def main(argv: list[str] | None = None) -> int:
    """The console script. Only a real process entry (argv=None) moves descriptor 2 into a log
    file; in-process callers (tests, notebooks) keep their streams."""
    route = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command that continues after Ctrl-C is this one, plus --resume
    log_path = None
    if route and args.command in QUIET_COMMANDS:
        log_path = route_output(args.command, args.verbose)
        console.pending = f"log: {log_path}" + ("" if args.verbose else
                                                "  (engine messages go there; -v shows them here)")
        catch_interrupts()
    else:
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        if not args.verbose:
            # vLLM logs every engine detail at INFO; the progress bars are the story here.
            os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return args.func(args)
    except SelfspecError as e:
        console.end_status()
        console.pending = None  # still unshown: nothing ran, the error line says it all
        console.say(f"selfspec: error: {e}")
        return e.exit_code
    except BaseException as e:
        # After Ctrl-C, whatever surfaces (KeyboardInterrupt, or vLLM's EngineDeadError because
        # the engine core got the same SIGINT) ends in the one line, not a traceback.
        if console.interrupted or isinstance(e, KeyboardInterrupt):
            console.end_status()
            console.say(interrupt_line())
            return 130
        if log_path is None or not isinstance(e, Exception):
            raise
        logging.getLogger("selfspec").exception("failed")  # the traceback, into the log
        console.end_status()
        first = str(e).splitlines()[0] if str(e) else ""
        console.say(f"selfspec: error: {type(e).__name__}: {first} (traceback in {log_path})")
        return 1


if __name__ == "__main__":
    sys.exit(main())
