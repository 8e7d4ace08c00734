"""The two ways `selfspec eval` runs a model; both see the same token ids and decode greedily, so
they give the same numbers (tests/integration/test_evaluation_integration.py checks it).

    DirectBackend  one vLLM engine, the base model plus every expert as a LoRA, planned and
                   checked exactly as the server plans its engine (serve/adapters.py); all
                   targets' requests go through it in mixed-adapter batches.
    HttpBackend    the serving stack: POST /v1/completions with model=<expert>|base, the prompt
                   as token ids; log-likelihoods through echo + logprobs (what lm-eval sends).

Prompts are tokenized here, not by the server, exactly as training tokenized them: the chat
template around the user turn, encoded without added special tokens, and each multiple-choice
option encoded on its own after it (train.py encodes the prompt and the answer separately).

`route` is what `auto` needs: the expert (or None for the base model) that the server would pick
for a user turn. The direct backend asks the router in the registry folder, the HTTP backend asks
the server itself with a one-token chat request (model=auto) and reads the `model` it answers with.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from core.engine import Adapter, EngineConfig, TokenRequest, VllmGenerator
from core.errors import SelfspecError
from core.precision import precision_facts
from core.registry import gain_refusal, load_registry

log = logging.getLogger(__name__)

BASE = "base"


@dataclass(frozen=True)
class Request:
    target: str  # "base" or an expert name
    prompt_ids: tuple[int, ...]
    max_tokens: int = 1
    logprobs: bool = False  # return the prompt tokens' log-probabilities


@dataclass(frozen=True)
class Result:
    text: str
    prompt_logprobs: tuple[float | None, ...] | None = None


@dataclass
class Served:
    """What a backend can evaluate: found before any model is loaded."""

    kind: str  # "vllm" | "http"
    base_model: dict  # {"spec", "path", "precision": the CPU's instruction set and dtype}
    experts: dict[str, dict]  # name -> {"version", "lora_name"}
    skipped: dict[str, str] = field(default_factory=dict)  # expert -> why it is left out
    registry_revision: int | None = None
    endpoint: str | None = None


class ChatTokens:
    """The base model's chat template and tokenizer, as training used them."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def chat(self, user: str) -> tuple[int, ...]:
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
        return tuple(self.tokenizer.encode(text, add_special_tokens=False))

    def text(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(text, add_special_tokens=False))


# ---------------------------------------------------------------- direct vLLM engine
def plan_direct(experts_dir: Path, want_experts: bool):
    """The server's own engine plan and adapter checks over the registry (no engine yet)."""
    from serve.adapters import check_adapters, plan_engine
    from serve.config import build_serve_config

    registry = load_registry(experts_dir)
    plan = plan_engine(build_serve_config({"experts_dir": str(experts_dir)}), registry)
    verdicts = check_adapters(registry, experts_dir, plan) if want_experts else None
    experts = {n: {"version": e.version, "lora_name": e.lora_name}
               for n, e in sorted((verdicts.ok if verdicts else {}).items())}
    served = Served("vllm", {"spec": plan.base_spec, "path": str(plan.base_path)}, experts,
                    dict(verdicts.skipped) if verdicts else {}, registry.revision)
    return served, plan, registry


class DirectBackend:
    # Requests per engine call: enough to fill vLLM CPU's default batch (256 sequences) while the
    # progress bar still moves every few seconds.
    CHUNK = 256

    def __init__(self, experts_dir: Path, served: Served, plan, registry, engine_cfg=None,
                 need_router: bool = False):
        from serve.adapters import adapter_dir, lora_int_id

        self.served = served
        self.gains = {n: e.gain for n, e in registry.experts.items()}  # for `route`
        self.router = None
        if need_router:  # before the engine: a router problem should not cost an engine start
            from router.index import load_router
            self.router = load_router(experts_dir)
        self.engine = VllmGenerator(plan.base_path, engine_cfg or EngineConfig(kv_cache_gib=1),
                                    max_lora_rank=plan.max_lora_rank, max_loras=plan.max_loras,
                                    lora_target_modules=plan.target_modules)
        served.base_model["precision"] = {
            **precision_facts(self.engine.cfg_dtype, self.engine.dtype),
            "engine_dtype": self.engine.engine_dtype}
        self.tokens = ChatTokens(self.engine.tokenizer)
        self.adapters: dict[str, Adapter] = {}
        from vllm.lora.request import LoRARequest
        for name in list(served.experts):
            entry = registry.experts[name]
            adapter = Adapter(entry.lora_name, lora_int_id(entry.lora_name),
                              adapter_dir(entry, experts_dir))
            try:  # load now, as the server does: a broken adapter is left out, not fatal later
                self.engine.llm.llm_engine.add_lora(
                    LoRARequest(adapter.name, adapter.int_id, str(adapter.path)))
            except Exception as e:  # noqa: BLE001 - vLLM's loader errors are varied
                served.skipped[name] = f"vLLM could not load {entry.adapter_path}: {e}"
                del served.experts[name]
                log.error("expert %s left out: %s", name, served.skipped[name])
                continue
            self.adapters[name] = adapter

    def complete(self, requests: list[Request], progress: Callable[[int], None]) -> list[Result]:
        out: list[Result] = []
        for start in range(0, len(requests), self.CHUNK):
            chunk = requests[start:start + self.CHUNK]
            got = self.engine.complete_tokens([
                TokenRequest(r.prompt_ids, r.max_tokens, self.adapters.get(r.target), r.logprobs)
                for r in chunk])
            out += [Result(g.text, g.prompt_logprobs) for g in got]
            progress(len(chunk))
        return out

    def route(self, users: list[str]) -> list[str | None]:
        # The server's chat path routes on the last user turn, then answers with the base model
        # when the chosen expert is not served, or (router.require_gain, the server's default)
        # did not beat the base on its validation split (serve/selection.py): the same here.
        from serve.config import RouterOptions

        rule = RouterOptions()
        choices = self.router.route_batch(users)
        return [c.expert if c.expert in self.served.experts and not gain_refusal(
                    self.gains.get(c.expert), rule.require_gain, rule.gain_max_p) else None
                for c in choices]

    def close(self) -> None:
        self.engine.close()


# ---------------------------------------------------------------- HTTP endpoint
def _api_base(endpoint: str) -> str:
    url = endpoint.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


def probe_endpoint(endpoint: str, api_key: str | None, timeout: float = 10.0) -> Served:
    """GET /v1/models and /health: what the server serves. Fails in seconds when unreachable."""
    import httpx

    base = _api_base(endpoint)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        models = httpx.get(f"{base}/models", headers=headers, timeout=timeout)
    except httpx.HTTPError as e:
        raise SelfspecError(f"cannot reach the endpoint {endpoint} ({e.__class__.__name__}: "
                            f"{e}): start it with `selfspec serve`, or fix --endpoint") from None
    if models.status_code == 401:
        raise SelfspecError(f"{endpoint} refused the API key: pass the server's key with "
                            "--api-key (or $SELFSPEC_API_KEY)")
    if models.status_code != 200:
        raise SelfspecError(f"GET {base}/models answered {models.status_code}: "
                            f"{models.text[:200]} (is {endpoint} a selfspec server?)")
    cards = models.json().get("data", [])
    base_card = next((c for c in cards if c.get("id") == BASE), None)
    if base_card is None:
        raise SelfspecError(f"{endpoint} lists no 'base' model: it is not a selfspec server")
    experts = {c["id"]: {"version": c.get("version"), "lora_name": c.get("root")}
               for c in cards if c.get("id") not in (BASE, "auto")}
    revision, precision = None, None
    try:
        health = httpx.get(f"{endpoint.rstrip('/').removesuffix('/v1')}/health",
                           headers=headers, timeout=timeout)  # its details need the key
        revision = health.json().get("registry_revision")
        precision = health.json().get("precision")  # the server's CPU and engine dtype
    except (httpx.HTTPError, ValueError):
        pass  # the revision is a fact for the report, not needed to evaluate
    aliases = [a for a in base_card.get("aliases") or [] if a != BASE]
    spec = aliases[0] if aliases else base_card.get("root")
    return Served("http", {"spec": spec, "path": base_card.get("root"), "precision": precision},
                  dict(sorted(experts.items())), dict(models.json().get("skipped") or {}),
                  revision, endpoint)


class HttpBackend:
    PROMPTS_PER_REQUEST = 8  # prompts per /v1/completions call (one target, one kind)

    def __init__(self, served: Served, api_key: str | None, tokenizer_path: str,
                 concurrency: int = 8, timeout: float = 600.0):
        import httpx
        from transformers import AutoTokenizer

        self.served, self.base = served, _api_base(served.endpoint or "")
        self.tokens = ChatTokens(AutoTokenizer.from_pretrained(tokenizer_path))
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=timeout,
                                   limits=httpx.Limits(max_connections=concurrency))
        self.pool = ThreadPoolExecutor(concurrency)

    def _post(self, path: str, body: dict) -> dict:
        r = self.client.post(f"{self.base}{path}", json=body)
        if r.status_code != 200:
            raise SelfspecError(f"POST {self.base}{path} (model {body.get('model')!r}) answered "
                                f"{r.status_code}: {r.text[:300]}")
        return r.json()

    def _batch(self, reqs: list[Request]) -> list[Result]:
        first = reqs[0]
        body = {"model": first.target, "prompt": [list(r.prompt_ids) for r in reqs],
                "max_tokens": first.max_tokens, "temperature": 0}
        if first.logprobs:
            body |= {"echo": True, "logprobs": 1}
        choices = sorted(self._post("/completions", body)["choices"], key=lambda c: c["index"])
        out = []
        for r, c in zip(reqs, choices):
            if first.logprobs:
                lps = tuple(c["logprobs"]["token_logprobs"][:len(r.prompt_ids)])
                # echo returns the prompt followed by the generated token: drop that from text
                out.append(Result("", lps))
            else:
                out.append(Result(c["text"]))
        return out

    def complete(self, requests: list[Request], progress: Callable[[int], None]) -> list[Result]:
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[(r.target, r.max_tokens, r.logprobs)].append(i)
        batches = [idx[k:k + self.PROMPTS_PER_REQUEST] for idx in groups.values()
                   for k in range(0, len(idx), self.PROMPTS_PER_REQUEST)]
        out: list[Result | None] = [None] * len(requests)

        def run(batch: list[int]) -> None:
            for i, res in zip(batch, self._batch([requests[i] for i in batch])):
                out[i] = res
            progress(len(batch))

        for f in [self.pool.submit(run, b) for b in batches]:
            f.result()
        return out  # type: ignore[return-value]

    def route(self, users: list[str]) -> list[str | None]:
        def one(user: str) -> str | None:
            body = {"model": "auto", "messages": [{"role": "user", "content": user}],
                    "max_tokens": 1, "temperature": 0}
            name = self._post("/chat/completions", body)["model"]
            return None if name == BASE else name

        return list(self.pool.map(one, users))

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.client.close()
