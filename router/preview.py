"""A router over experts that are still being made.

`selfspec up` answers before any expert exists. Meanwhile its router is built from the seeds
and descriptions of the shipped domains being specialized (the exemplars a seeds-only registry
would hold), next to the experts already published, so `model: "auto"` shows where a query will
go once they exist. serve/ turns a choice of such a domain into the base model, with a reason
that says so; the index on disk stays the registry's own and is never written here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from core.encoder import Encoder
from core.errors import SelfspecError
from core.registry import Registry
from core.seeds import load_domain
from router.route import Router

log = logging.getLogger(__name__)


def preview_router(registry: Registry, pending: Iterable[str],
                   encoder: Encoder | str | None) -> tuple[Router, tuple[str, ...]] | None:
    """(router over the registry's experts + the pending domains' seeds, the pending names it
    covers), or None when no pending domain has shipped seeds to route by."""
    exemplars = {n: list(e.exemplars) for n, e in registry.experts.items()}
    descriptions = {n: e.description for n, e in registry.experts.items()}
    previewed = []
    for name in sorted(set(pending) - set(exemplars)):
        try:
            domain = load_domain(name)
        except SelfspecError as e:
            # A domain specialized from a folder of its own: the server cannot see its seeds.
            log.info("no routing preview for %s: %s", name, e)
            continue
        if domain.name != name:
            continue
        exemplars[name] = [s.instruction for s in domain.seeds]
        descriptions[name] = domain.description
        previewed.append(name)
    if not previewed:
        return None
    return Router.from_exemplars(exemplars, encoder, descriptions=descriptions), tuple(previewed)
