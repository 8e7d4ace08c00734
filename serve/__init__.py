"""Serving: every expert as a LoRA adapter in one vLLM engine, the router, and an OpenAI-compatible
HTTP ingress, assembled as a Ray Serve application by `serve.app.build_app`.

    engine.py             the vLLM deployment (vllm_backend.py), adapters planned in adapters.py
    router_deployment.py  the batched router deployment
    ingress.py            HTTP routes; selection.py picks the expert, protocol.py parses requests
    errors.py             every error -> HTTP status + OpenAI error body, in one place
    cli.py                `selfspec serve`, `selfspec up`, `selfspec bench serving` (bench.py)
"""
