"""Request parsing for the ingress: raw bytes -> vLLM's own OpenAI request models
(`ChatCompletionRequest`, `CompletionRequest`), plus the few checks those models leave open.

vLLM's models accept (and silently ignore) unknown fields, and accept any chat role. A public
endpoint should say "unsupported parameter" instead, and must not accept vLLM's server-side
extensions from a client (request chat templates, KV-transfer params, multimodal kwargs, prompt
embeddings), so each endpoint has an allow-list: OpenAI's parameters plus vLLM's sampling
extensions. The engine-side models keep validating everything else (max_tokens vs context, ...).
"""

from __future__ import annotations

import json

from serve.errors import InvalidRequestError, LimitExceededError

# OpenAI's chat/completions parameters (those vLLM implements) + vLLM sampling extensions.
_SAMPLING = {"model", "frequency_penalty", "presence_penalty", "logit_bias", "logprobs",
             "max_tokens", "n", "seed", "stop", "stream", "stream_options", "temperature",
             "top_p", "user", "response_format", "top_k", "min_p", "repetition_penalty",
             "min_tokens", "stop_token_ids", "ignore_eos", "skip_special_tokens",
             "include_stop_str_in_output", "structured_outputs", "prompt_logprobs",
             "spaces_between_special_tokens", "bad_words"}
CHAT_FIELDS = _SAMPLING | {"messages", "top_logprobs", "max_completion_tokens", "tools",
                           "tool_choice", "parallel_tool_calls", "reasoning_effort",
                           "include_reasoning", "add_generation_prompt",
                           "continue_final_message", "echo", "chat_template_kwargs"}
COMPLETION_FIELDS = _SAMPLING | {"prompt", "echo", "suffix", "add_special_tokens"}
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


# OpenAI requests nest a few levels (a tool's JSON schema perhaps 20); deeper is hostile, and
# would reach pydantic's and vLLM's recursive code (200,000 brackets were a 500).
MAX_JSON_DEPTH = 64


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidRequestError(f"the request body is not valid JSON ({e}); send a JSON "
                                  "object with Content-Type: application/json") from None
    except RecursionError:  # the C parser's own recursion guard, ~1000 levels
        raise _too_deep() from None
    if not isinstance(body, dict):
        raise InvalidRequestError(f"the request body must be a JSON object, got "
                                  f"{type(body).__name__}")
    if _depth(body) > MAX_JSON_DEPTH:
        raise _too_deep()
    return body


def _too_deep() -> LimitExceededError:
    return LimitExceededError(f"the request body nests JSON more than {MAX_JSON_DEPTH} levels "
                              "deep; send a flatter request")


def _depth(value) -> int:
    """Nesting depth, walked without recursion (the point is to refuse what recursion chokes
    on)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, dict):
            v = v.values()
        elif not isinstance(v, list):
            continue
        deepest = max(deepest, d)
        if deepest > MAX_JSON_DEPTH:
            break
        todo.extend((child, d + 1) for child in v)
    return deepest


def check_limits(request, sent: dict, limits) -> None:
    """The ingress caps (`IngressOptions`: max_n, max_tokens, max_prompts) on a parsed request;
    over one -> LimitExceededError naming the field and the config key. Only what the client
    `sent` is capped: vLLM fills in defaults (16 tokens for a completion)."""
    n = getattr(request, "n", None) or 1
    if n > limits.max_n:
        raise LimitExceededError(f"n={n} is over this server's limit of {limits.max_n} choices "
                                 "per request (ingress.max_n)", param="n")
    for field in ("max_tokens", "max_completion_tokens"):
        asked = getattr(request, field, None)
        if asked is not None and asked > limits.max_tokens and field in sent:
            raise LimitExceededError(f"{field}={asked} is over this server's limit of "
                                     f"{limits.max_tokens} tokens per choice "
                                     "(ingress.max_tokens)", param=field)
    prompts = _prompt_count(getattr(request, "prompt", None))
    if prompts > limits.max_prompts:
        raise LimitExceededError(f"{prompts} prompts in one request is over this server's limit "
                                 f"of {limits.max_prompts} (ingress.max_prompts): send them in "
                                 "several requests", param="prompt")


def _prompt_count(prompt) -> int:
    """A string or one list of token ids is one prompt; a list of either is one per item."""
    if not isinstance(prompt, list) or not prompt or isinstance(prompt[0], int):
        return 1 if prompt else 0
    return len(prompt)


def _common(body: dict, allowed: set[str], endpoint: str) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidRequestError(
            f"unsupported parameter(s) for {endpoint}: {', '.join(unknown)}; supported: "
            f"{', '.join(sorted(allowed))}", param=unknown[0])
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequestError("'model' is required: a string such as \"auto\" (the router "
                                  "picks the expert), \"base\", or an expert name from "
                                  "GET /v1/models", param="model")


def parse_chat(body: dict):
    """-> vLLM ChatCompletionRequest, or InvalidRequestError naming the field and the fix."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    _common(body, CHAT_FIELDS, "/v1/chat/completions")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("'messages' must be a non-empty list of {role, content} "
                                  "objects", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequestError(f"messages[{i}] must be an object with 'role' and "
                                      "'content'", param=f"messages[{i}]")
        if m.get("role") not in CHAT_ROLES:
            raise InvalidRequestError(f"messages[{i}].role is {m.get('role')!r}; use one of "
                                      f"{', '.join(CHAT_ROLES)}", param=f"messages[{i}].role")
        content = m.get("content")
        # Only an assistant turn may omit content (it may carry tool_calls instead).
        if (content is None and m["role"] != "assistant") or \
                not isinstance(content, (str, list, type(None))):
            raise InvalidRequestError(f"messages[{i}].content must be a string or a list of "
                                      "content parts", param=f"messages[{i}].content")
    return ChatCompletionRequest.model_validate(body)  # pydantic errors map to 400


def parse_completion(body: dict):
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    _common(body, COMPLETION_FIELDS, "/v1/completions")
    prompt = body.get("prompt")
    if prompt is None or prompt == "" or prompt == []:
        raise InvalidRequestError("'prompt' is required: a string, a list of strings, or "
                                  "token ids", param="prompt")
    return CompletionRequest.model_validate(body)


def chat_route_text(request) -> str:
    """What the router reads for a chat: the last user turn (the question being asked)."""
    for m in reversed(request.messages):
        if m.get("role") == "user":
            return _text(m.get("content"))
    return _text(request.messages[-1].get("content"))


def completion_route_text(request) -> str | None:
    """The (first) text prompt; None for token-id prompts, which the router cannot read."""
    p = request.prompt
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p and isinstance(p[0], str):
        return p[0]
    return None


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return "\n".join(str(part.get("text", "")) for part in content
                         if isinstance(part, dict) and part.get("type") == "text")
    return ""
