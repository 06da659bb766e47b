"""Background loops owned by an app's lifespan."""

import asyncio
import contextlib
from typing import AsyncIterator, Coroutine


@contextlib.asynccontextmanager
async def background(loop: Coroutine, name: str) -> AsyncIterator[asyncio.Task]:
    """Run ``loop`` as a task for the duration of the block; cancel it and wait for it after."""
    task = asyncio.create_task(loop, name=name)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
