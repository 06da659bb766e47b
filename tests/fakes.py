"""A fake node agent, served over real sockets, whose every answer a test controls."""

from __future__ import annotations

import asyncio
from typing import Optional

from fastapi import FastAPI, Response
from fastapi.responses import StreamingResponse

from odla import protocol as p


class FakeNode:
    """Answers /run with its own name as the only token, or as told."""

    def __init__(self, name: str, models: list[str], status: int = 200, tokens: int = 1,
                 crash_after: Optional[int] = None, healthy: bool = True) -> None:
        self.name, self.models, self.status, self.tokens = name, models, status, tokens
        self.crash_after, self.healthy = crash_after, healthy
        self.jobs: list[dict] = []
        self.app = self._build()

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.post("/run")
        async def run(job: p.RunRequest) -> Response:
            self.jobs.append(job.model_dump())
            if self.status != 200:
                return Response(p.ErrorLine(error=f"{self.name} says {self.status}").model_dump_json(),
                                status_code=self.status, media_type="application/json")
            return StreamingResponse(self._lines(), media_type=p.NDJSON)

        @app.get("/health")
        async def health() -> Response:
            body = p.HealthResponse(status="healthy" if self.healthy else "unhealthy",
                                    node_id=self.name, models=self.models)
            return Response(body.model_dump_json(), status_code=200 if self.healthy else 503,
                            media_type="application/json")

        return app

    async def _lines(self):
        for i in range(self.tokens):
            if i == self.crash_after:
                raise ConnectionAbortedError("fake node dies")
            yield p.token_line(self.name)
            await asyncio.sleep(0)
        yield p.DONE_LINE
