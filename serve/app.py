"""`build_app(args) -> Application`: the one deploy entry point, used by

    selfspec serve / selfspec up                         (serve/cli.py)
    serve run deploy/local.yaml, serve deploy ...        (import_path: serve.app:build_app)
    serve.run(build_app({...}))                          (Python, the tests)

It validates `args` (serve/config.py) and binds three deployments: the engine (vLLM + every
expert as a LoRA), the router (CPU, batched), and the HTTP ingress that calls both. Nothing
heavy starts here: a bad argument fails in milliseconds, before any replica exists.
"""

from __future__ import annotations

import logging
from pathlib import Path

from core.errors import ConfigError
from core.registry import load_registry
from serve.config import ServeConfig, build_serve_config

log = logging.getLogger(__name__)


def resolve_config(args: dict | ServeConfig | None = None, **overrides) -> ServeConfig:
    """Validated config with what replicas cannot work out themselves fixed on the driver:
    an absolute experts dir (replicas may run elsewhere) and the API key from the environment."""
    cfg = build_serve_config(args, **overrides)
    load_registry(cfg.experts_dir)  # an unreadable registry fails now, not in three replicas
    return cfg.model_copy(update={"experts_dir": cfg.experts_dir.expanduser().resolve(),
                                  "api_key": cfg.resolved_api_key()})


def require_experts_dir(cfg: ServeConfig) -> None:
    """Refuse an experts dir that does not exist: a typo would otherwise start Ray and vLLM and
    serve the base model only. (A dir without registry.json is a fresh one, and fine.)"""
    if not cfg.experts_dir.is_dir():
        raise ConfigError(f"the experts dir {cfg.experts_dir} does not exist: pass --experts-dir "
                          "with the folder `selfspec specialize` published to, or run "
                          "`selfspec up` to make one")


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def refuse_open_exposure(host: str, cfg: ServeConfig, insecure_no_auth: bool = False) -> None:
    """Binding beyond this machine with no API key lets anyone on the network use the engine
    and the admin routes: refused unless asked for in so many words (the flag, or
    `insecure_no_auth: true` in a Serve YAML's args)."""
    if (host not in LOOPBACK and not cfg.resolved_api_key()
            and not (insecure_no_auth or cfg.insecure_no_auth)):
        raise ConfigError(f"--host {host} serves beyond this machine with no API key: pass "
                          "--api-key-file FILE (or set $SELFSPEC_API_KEY, or `api_key` in the "
                          "Serve YAML's args), or --insecure-no-auth (`insecure_no_auth: true` "
                          "in the args) to serve it open anyway")


def serve_http_host() -> str | None:
    """The HTTP host of the running Serve instance, or None when Serve is not up yet.

    A Serve YAML (`serve run` / `serve deploy deploy/gpu.yaml`) sets the host in its
    http_options, which never reach the app's args; the builder asks the controller instead, so
    that path is held to the same rule as `selfspec serve --host`. Ray has no public call for
    it, hence the private client."""
    import ray

    if not ray.is_initialized():
        return None
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    return client.http_config.host if client is not None else None


def read_api_key_file(path) -> str:
    """The API key from a file (first line): unlike --api-key, it does not show in `ps`."""
    try:
        key = Path(path).read_text(encoding="utf-8").strip().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the API key file {path}: {e}") from None
    if not key or not key[0].strip():
        raise ConfigError(f"the API key file {path} is empty: write the key on its first line")
    return key[0].strip()


def build_app(args: dict | None = None):
    from serve.engine import EngineServer
    from serve.ingress import IngressServer
    from serve.router_deployment import RouterServer

    cfg = resolve_config(args)
    host = serve_http_host()
    if host is not None:
        refuse_open_exposure(host, cfg)
    plain = cfg.model_dump(mode="json")
    e, r, i = cfg.engine, cfg.router, cfg.ingress
    engine = EngineServer.options(
        name="engine", max_ongoing_requests=e.max_ongoing_requests, **e.serve_options(),
        ray_actor_options=_actor_options(e, num_gpus=e.num_gpus)).bind(plain)
    router = RouterServer.options(
        name="router", max_ongoing_requests=r.max_ongoing_requests, **r.serve_options(),
        ray_actor_options=_actor_options(r)).bind(plain)
    return IngressServer.options(
        name="ingress", max_ongoing_requests=i.max_ongoing_requests, **i.serve_options(),
        ray_actor_options=_actor_options(i)).bind(engine, router, plain)


def _actor_options(opts, **extra) -> dict:
    return {"num_cpus": opts.num_cpus, "resources": dict(opts.resources), **extra}
