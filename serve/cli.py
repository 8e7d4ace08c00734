"""`selfspec serve`.
Parsing imports only the standard library; Ray, vLLM and the pipeline load inside the run
functions."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from core.console import console
from core.errors import ConfigError, SelfspecError
from core.registry import load_registry

DEFAULT_CONFIG = Path("deploy/local.yaml")


def add_parsers(sub) -> None:
    p = sub.add_parser("serve", help="serve every expert behind one OpenAI-compatible endpoint",
                       description="Ray Serve + one vLLM engine with every expert as a LoRA "
                       "adapter + the router. model='auto' routes each request.")
    add_serve_flags(p)
    p.set_defaults(func=run_serve)


def add_serve_flags(p) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help=f"a Ray Serve config (default: {DEFAULT_CONFIG} when present)")
    p.add_argument("--experts-dir", type=Path, default=None, help="the registry (default: "
                   "the config's, else experts/)")
    p.add_argument("--host", default=None, help="default: the config's, else 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default: the config's, else 8000")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 and /admin "
                   "(default: $SELFSPEC_API_KEY; unset: open). Shows in `ps`: prefer "
                   "--api-key-file or the environment")
    p.add_argument("--api-key-file", type=Path, default=None,
                   help="read the API key from this file's first line")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="serve on a non-loopback --host with no API key (refused otherwise)")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32", "float16"), default=None,
                   help="engine precision (default: the config's engine.dtype, else auto: bf16 "
                   "on GPUs and CPUs with AMX/AVX512-BF16, float32 on other CPUs)")


def with_dtype(app_args: dict, dtype: str | None) -> dict:
    """The Serve app's args with --dtype, when given, over the config file's engine.dtype."""
    if dtype is None:
        return app_args
    return {**app_args, "engine": {**(app_args.get("engine") or {}), "dtype": dtype}}


def deploy_settings(path: Path | None) -> dict:
    """A Serve config file -> {args, name, route_prefix, host, port}, validated by Ray's schema."""
    import yaml

    if path is None:
        path = DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None
    if path is None:
        return {"args": {}, "name": "selfspec", "route_prefix": "/", "host": None, "port": None}
    try:
        raw = yaml.safe_load(Path(path).read_text())
        from ray.serve.schema import ServeDeploySchema
        schema = ServeDeploySchema.model_validate(raw)
    except (OSError, yaml.YAMLError, ValueError) as e:
        raise ConfigError(f"{path}: not a valid Ray Serve config ({e})") from None
    apps = [a for a in schema.applications if a.import_path == "serve.app:build_app"]
    if len(apps) != 1:
        raise ConfigError(f"{path}: needs exactly one application with import_path "
                          "serve.app:build_app")
    http = schema.http_options
    return {"args": apps[0].args or {}, "name": apps[0].name,
            "route_prefix": apps[0].route_prefix or "/",
            "host": getattr(http, "host", None), "port": getattr(http, "port", None)}


def cli_api_key(args) -> str | None:
    """--api-key-file, else --api-key (else the config's, else $SELFSPEC_API_KEY)."""
    from serve.app import read_api_key_file

    if getattr(args, "api_key_file", None) is not None:
        return read_api_key_file(args.api_key_file)
    if args.api_key:
        console.say("warning: --api-key shows in `ps` to every user of this machine; pass "
                    "--api-key-file FILE or set SELFSPEC_API_KEY instead")
    return args.api_key


def run_serve(args) -> int:
    from serve.app import refuse_open_exposure, require_experts_dir, resolve_config

    settings = deploy_settings(args.config)
    cfg = resolve_config(with_dtype(settings["args"], args.dtype), experts_dir=args.experts_dir,
                         api_key=cli_api_key(args))
    require_experts_dir(cfg)
    host = args.host or settings["host"] or "127.0.0.1"
    if getattr(args, "insecure_no_auth", False):  # the app builder checks the host again
        cfg = cfg.model_copy(update={"insecure_no_auth": True})
    refuse_open_exposure(host, cfg)
    port = args.port or settings["port"] or 8000
    return serve_forever(cfg, host, port, settings["name"], settings["route_prefix"],
                         verbose=getattr(args, "verbose", False))


def serve_forever(cfg, host: str, port: int, name: str, prefix: str, verbose: bool) -> int:
    """`selfspec serve`: start, print how to use it, serve until Ctrl-C or SIGTERM."""
    registry = load_registry(cfg.experts_dir)
    if not registry.experts:
        console.say(f"note: no experts in {cfg.experts_dir}: serving the base model only "
                    "(run `selfspec up` to specialize the shipped domains)")
    console.interrupt_message = lambda: (
        f"stopped: the experts in {cfg.experts_dir} are kept; serve them again with: "
        "selfspec serve" + (f" --experts-dir {cfg.experts_dir}" if cfg.experts_dir !=
                            Path("experts").resolve() else ""))
    server = start_serving(cfg, host, port, name, prefix, verbose, len(registry.experts))
    try:
        if server.url is None:
            return 1
        key = cfg.resolved_api_key()
        print(ready_message(server.url, registry, key, _health(server.url, key)), flush=True)
        console.quiet_stdout()
        while True:
            time.sleep(3600)
    finally:
        server.stop()


class Server:
    """A running Serve app (see start_serving); stop() takes it down, once."""

    def __init__(self, name: str, own_ray: bool):
        self.name, self.own_ray, self.url, self.stopped = name, own_ray, None, False

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        import ray
        from ray import serve

        # A second Ctrl-C while replicas stop would leave the engine processes behind.
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            serve.delete(self.name) if not self.own_ray else serve.shutdown()
        finally:
            ray.shutdown()
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)


def start_serving(cfg, host: str, port: int, name: str, prefix: str, verbose: bool,
                  experts: int) -> Server:
    """Ray + the Serve app, behind a spinner. server.url is None when a replica failed to start
    (the reason is printed); stop() the server in either case."""
    import ray
    from ray import serve

    from serve.app import build_app

    server = Server(name, own_ray=not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"))
    what = f"{experts} expert(s)" if experts else "the base model"
    try:
        with console.spinner(f"starting Ray Serve + vLLM with {what} (a minute or more on "
                             "CPU)"):
            ray.init(include_dashboard=False, log_to_driver=verbose, namespace="selfspec")
            serve.start(http_options={"host": host, "port": port})
            serve.run(build_app(cfg.model_dump(mode="json")), name=name, route_prefix=prefix)
    except SelfspecError:
        server.stop()
        raise
    except Exception as e:  # a replica failed to start: say where to look
        if console.interrupted:  # Ctrl-C surfaced as a Ray error: main prints the one line
            server.stop()
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        console.say(f"selfspec: error: the server did not start ({type(e).__name__}: {first}); "
                    "replica logs are in /tmp/ray/session_latest/logs/serve/ (rerun with -v to "
                    "see them here)")
        return server
    except BaseException:
        server.stop()
        raise
    server.url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}" + \
        prefix.rstrip("/")
    return server


def _health(url: str, api_key: str | None = None) -> dict:
    import json
    import urllib.request

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{url}/health", headers=headers),
                                    timeout=30) as r:
            return json.loads(r.read())
    except (OSError, ValueError) as e:
        return {"status": f"unknown ({e})", "skipped": {}}


def ready_message(url: str, registry, api_key: str | None, health: dict,
                  building: list[str] = ()) -> str:
    experts = sorted(registry.experts)
    question = registry.experts[experts[0]].exemplars[0] if experts else "What is a bond?"
    question = question.replace("'", "").replace('"', "")[:120]
    # The key itself is never printed (terminal scrollback, CI logs): the examples read it
    # from the environment.
    key = "$SELFSPEC_API_KEY" if api_key else "none"
    lines = [f"selfspec is serving at {url}/v1  (status: {health.get('status')})",
             f"  models: auto, base, {', '.join(experts) or '(no experts yet)'}"]
    if api_key:
        lines.append("  API key required (not shown): the examples below read it from "
                     "$SELFSPEC_API_KEY")
    for name, why in (health.get("skipped") or {}).items():
        lines.append(f"  left out: {name}: {why.splitlines()[0]}")
    if building:
        lines.append(f"  being made: {', '.join(building)} (each joins the models when it is "
                     "published; auto answers with the base model until then)")
    auth = ' -H "Authorization: Bearer $SELFSPEC_API_KEY"' if api_key else ""
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": question}],
                       "max_tokens": 64})
    python = (f"from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='{key}'); "
              f"r = c.chat.completions.with_raw_response.create(model='auto', "
              f"messages=[{{'role': 'user', 'content': '{question}'}}], max_tokens=64); "
              f"print(r.headers['x-selfspec-expert'], r.parse().choices[0].message.content)")
    curl = f"  curl -si {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\"
    lines += ["", "try it:", curl, f"    -d '{body}'",
              "", f'  python -c "{python}"',
              "", "Ctrl-C stops the server" + (" and the specialization (running `selfspec "
                                               "up` again continues it)." if building else ".")]
    return "\n".join(lines)
