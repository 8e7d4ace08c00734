"""The contract both halves share: the expert registry's schema, the errors, vLLM's LoRA rules,
base-model resolution, seed sets and the chat turn train and eval render alike.

Nothing here imports `specialize`, `router`, `serve` or `evaluation` (tests/test_architecture.py
checks it), so any half can depend on it without pulling in another half.
"""
