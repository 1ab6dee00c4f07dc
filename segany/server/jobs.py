"""Long requests (everything-mode proposals, COCO import) as cancellable jobs with a time limit.

The work runs in a worker thread and calls `job.check()` between steps; the request waits for it
while watching the connection, so a client that goes away (closed tab, aborted fetch) stops its job
within a step instead of leaving it to run for minutes. At most `max_running` jobs run at once; more
are answered 503 with Retry-After.
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Callable

from fastapi import Request
from starlette.concurrency import run_in_threadpool


class Cancelled(Exception):
    """The job was cancelled (its client went away)."""


class TooLong(ValueError):
    """The job ran past its time limit: the request asks for too much work (422, ask for less)."""


class Busy(TimeoutError):
    """Too many jobs running: the client should try again later (503)."""


class Job:
    def __init__(self, time_limit_s: float) -> None:
        self._cancel = threading.Event()
        self.time_limit_s = time_limit_s
        self.deadline = time.monotonic() + time_limit_s

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check(self) -> None:
        """Stop the work here if the job was cancelled or ran past its time limit."""
        if self._cancel.is_set():
            raise Cancelled("the job was cancelled")
        if time.monotonic() > self.deadline:
            raise TooLong(f"the job took longer than its limit of {self.time_limit_s:g} s: ask for less "
                          "(fewer points per side, a smaller file)")


class Jobs:
    def __init__(self, max_running: int = 2, time_limit_s: float = 300.0) -> None:
        self.max_running = max(1, max_running)
        self.time_limit_s = time_limit_s
        self._lock = threading.Lock()
        self.running = 0
        self.cancelled = 0  # jobs stopped because their client went away (for tests and logs)

    async def run(self, request: Request, work: Callable[..., Any], *args: Any) -> Any:
        """`work(job, *args)` in a worker thread; cancelled when the client disconnects."""
        with self._lock:
            if self.running >= self.max_running:
                raise Busy(f"{self.running} long jobs are running already; try again shortly")
            self.running += 1
        job = Job(self.time_limit_s)
        task = asyncio.ensure_future(run_in_threadpool(work, job, *args))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.2)
                if done:
                    return task.result()
                if not job.cancelled and await request.is_disconnected():
                    job.cancel()
                    self.cancelled += 1
        finally:
            job.cancel()
            with self._lock:
                self.running -= 1
