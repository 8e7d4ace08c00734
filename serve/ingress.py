"""The HTTP ingress: OpenAI's routes, API key, body limit, model selection, decision headers and
metrics. Protocol work (rendering, sampling checks, SSE formatting) happens in the engine with
vLLM's serving classes; this file only moves bytes and explains the decision.

    POST /v1/chat/completions  POST /v1/completions  GET /v1/models
    GET /health  GET /metrics  POST /admin/reload

`build_http_app(service)` is plain FastAPI (unit tests drive it with fakes); `IngressServer` is
the Ray Serve deployment that builds it around deployment handles.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException

from core.build_status import describe_in_progress, read_build_status
from core.errors import SelfspecError
from serve.clients import (
    Chunk,
    EngineClient,
    HandleEngine,
    HandleRouter,
    RouterClient,
    Usage,
)
from serve.config import ServeConfig, build_serve_config
from serve.errors import (
    AuthenticationError,
    PayloadTooLargeError,
    RequestTimeoutError,
    json_error,
    map_exception,
)
from serve.metrics import CONTENT_TYPE_LATEST, ServeMetrics
from serve.protocol import (
    chat_route_text,
    check_limits,
    completion_route_text,
    parse_chat,
    parse_completion,
    parse_json,
)
from serve.selection import AUTO, BASE, Selector
from serve.watch import board_actor, broadcast_reload, replica_identity

log = logging.getLogger(__name__)

# How long /admin/reload waits for every replica to act on it (loading a new adapter or
# rebuilding the router index takes seconds); it answers with those still behind after that.
RELOAD_WAIT_S = 60.0


async def _cancel(items) -> None:
    """Stop the engine generating for a stream nobody will read (a Serve response generator
    has cancel(), an in-process one aclose())."""
    if hasattr(items, "cancel"):
        items.cancel()
    elif hasattr(items, "aclose"):
        await items.aclose()


class Service:
    def __init__(self, engine: EngineClient, router: RouterClient, cfg: ServeConfig,
                 board=None):
        self.engine, self.router, self.cfg = engine, router, cfg
        self.board = board  # the app's ReloadBoard actor (serve/watch.py); None outside Serve
        self.api_key = cfg.resolved_api_key()
        self.selector = Selector(engine, router, cfg.router.require_gain, cfg.router.gain_max_p)
        self.metrics = ServeMetrics()

    def authorized(self, raw: Request) -> bool:
        if not self.api_key:
            return True
        scheme, _, token = raw.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.api_key.encode())

    def authorize(self, raw: Request) -> None:
        if not self.authorized(raw):
            raise AuthenticationError("missing or wrong API key: send 'Authorization: Bearer "
                                      "<key>' with the key the server was started with "
                                      "(--api-key or $SELFSPEC_API_KEY)")

    async def read_body(self, raw: Request) -> bytes:
        limit = self.cfg.ingress.max_body_bytes
        declared = raw.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise PayloadTooLargeError(f"request body of {declared} bytes is over the "
                                       f"{limit}-byte limit (ingress.max_body_bytes)")
        parts, size = [], 0
        async for part in raw.stream():  # chunked uploads declare no length: count as we go
            size += len(part)
            if size > limit:
                raise PayloadTooLargeError(f"request body is over the {limit}-byte limit "
                                           "(ingress.max_body_bytes)")
            parts.append(part)
        return b"".join(parts)

    async def generate(self, kind: str, raw: Request):
        endpoint = f"/v1/{'chat/completions' if kind == 'chat' else 'completions'}"
        t0, sel, status, streaming = time.perf_counter(), None, 200, False
        try:
            self.authorize(raw)
            body = parse_json(await self.read_body(raw))
            if kind == "chat":
                request = parse_chat(body)
                text = chat_route_text(request)
            else:
                request = parse_completion(body)
                text = completion_route_text(request)
            check_limits(request, body, self.cfg.ingress)
            sel = await self.selector.select(request.model, text)
            self.metrics.observe_selection(sel)
            if not request.stream:
                answer = await self._in_time(self.engine.respond(kind, request, sel.expert),
                                             t0)
                self._count(sel, answer.usage)
                return JSONResponse(answer.body, headers=sel.headers())
            items = self.engine.generate(kind, request, sel.expert)
            try:  # a request the engine refuses raises here, before any byte is sent
                first = await self._in_time(items.__anext__(), t0)
            except RequestTimeoutError:
                await _cancel(items)
                raise
            streaming = True
            return StreamingResponse(self._sse(first, items, sel, endpoint, t0),
                                     media_type="text/event-stream", headers=sel.headers())
        except Exception as e:  # noqa: BLE001 - every failure becomes an OpenAI error
            status, err = map_exception(e)
            return JSONResponse(err, status_code=status,
                                headers=sel.headers() if sel is not None else None)
        finally:
            if not streaming:
                self.metrics.observe_request(endpoint, sel, status, time.perf_counter() - t0)

    def _count(self, sel, usage: Usage) -> None:
        self.metrics.observe_tokens(sel, usage.prompt_tokens, usage.completion_tokens)

    async def _in_time(self, awaitable, t0: float):
        """Await within what is left of ingress.request_timeout_s (counted from `t0`, the
        request's start); past it, the awaited call is cancelled and the client gets a 408."""
        limit = self.cfg.ingress.request_timeout_s
        try:
            return await asyncio.wait_for(awaitable, limit - (time.perf_counter() - t0))
        except TimeoutError:
            raise RequestTimeoutError(f"the request ran past this server's limit of {limit:g} s "
                                      "(ingress.request_timeout_s): ask for fewer tokens or "
                                      "choices, or retry when the server is less busy") from None

    async def _sse(self, first, items, sel, endpoint: str, t0: float):
        status, done = 200, False
        try:
            item = first
            while True:
                if isinstance(item, Chunk):
                    yield item.event
                elif isinstance(item, Usage):
                    self._count(sel, item)
                try:
                    item = await self._in_time(items.__anext__(), t0)
                except StopAsyncIteration:
                    break
            done = True
        except Exception as e:  # noqa: BLE001 - headers are sent: report in-band, like vLLM
            status, err = map_exception(e)
            yield f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n"
        finally:
            if not done:  # client went away (or the engine failed): stop generating for it
                await _cancel(items)
            self.metrics.observe_request(endpoint, sel, status, time.perf_counter() - t0)

    async def models(self, raw: Request) -> dict:
        from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelList

        self.authorize(raw)
        cat = await self.selector.get_catalog(fresh=True)
        base = cat["base"]
        cards = [ModelCard(id=AUTO, owned_by="selfspec", max_model_len=base["max_model_len"],
                           description="the router picks the expert for each request",
                           require_gain=self.cfg.router.require_gain,
                           gain_max_p=self.cfg.router.gain_max_p),
                 ModelCard(id=BASE, owned_by="selfspec", root=base["path"],
                           max_model_len=base["max_model_len"], aliases=base["aliases"],
                           description="the base model, no adapter")]
        cards += [ModelCard(id=name, owned_by="selfspec", parent=BASE, root=e["lora_name"],
                            max_model_len=base["max_model_len"], description=e["description"],
                            version=e["version"], lora_rank=e["rank"],
                            # expert - base on its validation split; None: not measured
                            gain=e.get("gain"))
                  for name, e in cat["experts"].items()]
        out = ModelList(data=cards).model_dump()
        out["skipped"] = cat["skipped"]
        out["building"] = self.building()
        return out

    async def health(self, raw: Request) -> JSONResponse:
        # Probes (load balancers, Kubernetes) get the status without the key; the details
        # (server paths, skip reasons, exception text) only with it, as /v1 does.
        detail = self.authorized(raw)
        try:
            cat = await self.selector.get_catalog(fresh=True)
            router = await self.router.info()
        except Exception as e:  # noqa: BLE001 - a health check reports, never raises
            error = {"error": map_exception(e)[1]["error"]} if detail else {}
            return JSONResponse({"status": "unavailable", **error}, status_code=503)
        # degraded: an expert is left out, or registry.json is gone or broken and the last good
        # registry is being served (serve/watch.py)
        problem = cat.get("registry_problem") or router.get("registry_problem")
        status = "degraded" if cat["skipped"] or problem else "ok"
        if not detail:
            return JSONResponse({"status": status, "auth": True,
                                 "detail": "send the API key for the details"})
        return JSONResponse({"status": status,
                             "registry_problem": problem,
                             "experts": list(cat["experts"]), "skipped": cat["skipped"],
                             "registry_revision": cat["revision"], "lora": cat["lora"],
                             "router": router, "auth": bool(self.api_key),
                             "precision": cat.get("precision"),
                             "cpu_pinning": cat.get("cpu_pinning"),
                             "building": self.building()})

    def building(self) -> dict[str, dict]:
        """The experts a specialize run is still making (its <experts>/building.json): a
        one-page file read per call, so a status is never older than the run's last write."""
        return describe_in_progress(read_build_status(self.cfg.experts_dir))

    async def reload(self, raw: Request) -> dict:
        self.authorize(raw)
        cat = await self.selector.reload()
        router = await self.router.reload()
        out = {"registry_revision": cat["revision"], "experts": list(cat["experts"]),
               "skipped": cat["skipped"], "router": router}
        if self.board is not None and self.cfg.registry_poll_s > 0:
            # The two calls above reached one replica of each deployment; the board reaches
            # the others through their watch loops, and this waits until they acted on it.
            out["replicas"] = await broadcast_reload(self.board, self.cfg.registry_poll_s,
                                                     RELOAD_WAIT_S)
        return out


def build_http_app(service: Service) -> FastAPI:
    app = FastAPI(title="selfspec", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException):  # unknown route, wrong method
        return json_error(exc.status_code, str(exc.detail))

    @app.exception_handler(SelfspecError)  # our typed errors (401 on /v1/models, ...)
    async def _ours(_: Request, exc: SelfspecError):
        return json_error(exc)

    @app.exception_handler(Exception)  # anything else: a 500 in OpenAI's format, then logged
    async def _any(_: Request, exc: Exception):
        return json_error(exc)

    @app.post("/v1/chat/completions")
    async def chat(raw: Request):
        return await service.generate("chat", raw)

    @app.post("/v1/completions")
    async def completions(raw: Request):
        return await service.generate("completion", raw)

    @app.get("/v1/models")
    async def models(raw: Request):
        return await service.models(raw)

    @app.get("/health")
    async def health(raw: Request):
        return await service.health(raw)

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/reload")
    async def reload(raw: Request):
        return await service.reload(raw)

    return app


@serve.deployment
@serve.ingress()
class IngressServer:
    def __init__(self, engine, router, cfg: dict):
        cfg = build_serve_config(cfg)
        me = replica_identity()
        self.service = Service(HandleEngine(engine), HandleRouter(
            router, cfg.router.max_batch_size, cfg.router.batch_wait_timeout_s), cfg,
            board=board_actor(me[0]) if me is not None else None)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_http_app(self.service)

