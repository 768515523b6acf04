"""asyncio helpers shared by the sync wrappers of async APIs."""

from __future__ import annotations

import asyncio
import concurrent.futures


def run_coroutine(coro):
    """Run a coroutine to completion from sync code (in a helper thread when a loop is already running)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(asyncio.run, coro).result()
