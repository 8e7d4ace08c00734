"""A cheap registry watch: one `stat` of registry.json per poll. The publisher replaces the file
with `os.replace`, so a new publish always shows as a new inode/mtime/size; only then is the
registry parsed (and its `revision` compared by the caller)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from specialize.registry import REGISTRY_FILE

log = logging.getLogger(__name__)


class RegistryWatch:
    def __init__(self, experts_dir: Path):
        self.path = Path(experts_dir) / REGISTRY_FILE
        self.seen = self._stamp()

    def _stamp(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def changed(self) -> bool:
        """True once per change of registry.json since the last call."""
        stamp = self._stamp()
        if stamp == self.seen:
            return False
        self.seen = stamp
        return True


def start_watch(experts_dir: Path, poll_s: float,
                on_change: Callable[[], Awaitable[object]]) -> asyncio.Task | None:
    """Poll in the background of the running event loop; errors are logged, never fatal."""
    if poll_s <= 0:
        return None
    watch = RegistryWatch(experts_dir)

    async def loop() -> None:
        while True:
            await asyncio.sleep(poll_s)
            if watch.changed():
                try:
                    await on_change()
                except Exception:
                    log.exception("reload after a registry change failed; still serving the "
                                  "previous experts")

    return asyncio.get_running_loop().create_task(loop())
