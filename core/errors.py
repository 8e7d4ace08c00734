"""Typed errors for selfspec. Each carries a message that says what was wrong and how to fix it.

The CLI turns any `SelfspecError` into one readable line and a non-zero exit; `serve/` maps the
same classes to HTTP statuses in one place. Nothing else should catch these to re-word them.
"""

from __future__ import annotations


class SelfspecError(Exception):
    """Base class: a user-facing problem with a fix the message explains."""

    exit_code = 2


class ConfigError(SelfspecError):
    """A flag or config value is invalid (checked before any heavy work)."""


class SeedError(SelfspecError):
    """A seed file is missing or malformed; the message names the file, the item and the fix."""


class UnknownDomainError(SelfspecError):
    """The requested domain has no seed folder."""


class BaseModelError(SelfspecError):
    """The base model cannot be found or materialized."""


class AdapterError(SelfspecError):
    """An adapter that vLLM's LoRA loader would reject."""


class EncoderError(SelfspecError):
    """The sentence encoder (routing, retrieval, the domain check) cannot be loaded."""


class RegistryError(SelfspecError):
    """The expert registry is unreadable, of another format version, or not writable."""


class ExpertNotFoundError(RegistryError):
    """A named expert is not in the registry."""
