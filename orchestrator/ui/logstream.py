"""Server-Sent Events that stream a job's output, state and progress to its page.

Events: ``log`` ({"s": "out" or "err", "t": text}, with the byte offset after
the chunk as the event id), ``job`` (the job's state and timings), ``progress``,
``skipped`` (bytes left out before the shown tail) and ``end``. A reconnecting
EventSource sends the last id as Last-Event-ID and the stream resumes there.
"""

import asyncio
import codecs
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine

from orchestrator import jobs, outputs
from orchestrator.dispatch import Dispatcher
from orchestrator.outputs import OutputWriter
from orchestrator.timeutil import isoformat, utcnow
from orchestrator.transports.base import STDERR, STDOUT
from orchestrator.ui import common, progress

# Output older than this is left out of the page; the raw log has all of it.
TAIL_BYTES = 256 * 1024
STORED_BATCH_BYTES = 256 * 1024
KEEPALIVE_SECONDS = 15.0
# Each connection ends after about this long, give or take the waits of one or
# two seconds below, and the browser reconnects. A server shutdown therefore
# waits about this long at most for an open stream.
STREAM_SECONDS = 30.0
POLL_SECONDS = 1.0
QUEUE_WAIT_SECONDS = 1.0
PROGRESS_EVERY_SECONDS = 1.0
STORED_WAIT_SECONDS = 2.0
# A job's final state follows its writer's close within moments; a retry does not.
FINAL_WAIT_SECONDS = 2.0
STREAM_NAMES = {STDOUT: "out", STDERR: "err"}

Queue = asyncio.Queue[tuple[int, bytes] | None]


@dataclass
class Subscription:
    """A listener queue on one output writer, and the offset where it starts."""

    queue: Queue
    writer: OutputWriter
    live_from: int


def sse(event: str, data: Any, event_id: int | None = None) -> str:
    """Format one Server-Sent Event; JSON keeps the data on one line."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n"


def job_summary(row: Any) -> dict[str, Any]:
    """Build the state, timings and result of a job for the pages' scripts."""
    seconds = common.job_seconds(row)
    return {
        "id": row.id,
        "state": row.state,
        "label": common.state_label(row.state),
        "final": row.state in jobs.FINAL_STATES,
        "worker": row.worker_name,
        "exit_code": row.exit_code,
        "signal": row.signal,
        "reason": row.reason,
        "started_at": isoformat(row.started_at),
        "finished_at": isoformat(row.finished_at),
        "duration": common.format_duration(seconds),
        "log_bytes": row.log_bytes,
        "log_size": common.format_size(row.log_bytes),
        "log_truncated": bool(row.log_truncated),
    }


class JobStream:
    """One browser's view of one job's output, from a byte offset onwards."""

    def __init__(
        self,
        engine: Engine,
        dispatcher: Dispatcher,
        job_id: int,
        resume_from: int | None,
    ):
        self.engine = engine
        self.dispatcher = dispatcher
        self.job_id = job_id
        self.resume_from = resume_from
        self.position = 0
        self.tracker = progress.ProgressTracker()
        self.decoders = {s: _decoder() for s in STREAM_NAMES}
        self.row: Any = None
        self.sent_summary: dict[str, Any] | None = None
        self.progress_sent_at = 0.0
        self.closed_writer: OutputWriter | None = None

    async def events(self) -> AsyncIterator[str]:
        """Yield events until the job ends or the connection's time is up."""
        deadline = time.monotonic() + STREAM_SECONDS
        yield "retry: 1000\n\n"
        async for event in self._start():
            yield event
        while time.monotonic() < deadline:
            if self.row.state in jobs.FINAL_STATES:
                async for event in self._finish():
                    yield event
                return
            subscription = self._subscribe()
            if subscription is None:
                async for event in self._poll():
                    yield event
                continue
            async for event in self._follow(subscription, deadline):
                yield event
            if time.monotonic() >= deadline:
                return
            await self._wait_final()

    async def _start(self) -> AsyncIterator[str]:
        self.row = await self._load()
        if self.resume_from is not None:
            self.position = self.resume_from
        else:
            self.position = max(0, int(self.row.log_bytes) - TAIL_BYTES)
            if self.position:
                yield sse("skipped", {"bytes": self.position})
        self.tracker = await asyncio.to_thread(
            progress.seed_tracker, self.engine, self.job_id
        )
        yield self._summary_event(force=True)

    async def _finish(self) -> AsyncIterator[str]:
        async for event in self._stored(None):
            yield event
        yield self._summary_event(force=True)
        yield sse("end", {"state": self.row.state})

    async def _poll(self) -> AsyncIterator[str]:
        # Waiting, or running in another server process that shares the database.
        async for event in self._stored(None):
            yield event
        await asyncio.sleep(POLL_SECONDS)
        self.row = await self._load()
        event = self._summary_event()
        if event:
            yield event

    def _subscribe(self) -> Subscription | None:
        running = self.dispatcher.running.get(self.job_id)
        writer = running.writer if running is not None else None
        if running is None or writer is None or writer is self.closed_writer:
            return None
        # A retry or a reattached job's writer counts from zero until resume()
        # has read the stored size; until then the database is followed instead.
        resuming = running.spec.attempt > 1 or running.spec.resume_offsets is not None
        if resuming and writer.total_bytes == 0:
            return None
        queue = self.dispatcher.subscribe(self.job_id)
        if queue is None:
            return None
        # No await separates subscribe() from reading total_bytes, so every byte
        # past live_from reaches the queue and every byte before it the database.
        return Subscription(queue, writer, writer.total_bytes)

    async def _follow(
        self, subscription: Subscription, deadline: float
    ) -> AsyncIterator[str]:
        live_from = subscription.live_from
        try:
            await self._wait_stored(live_from)
            async for event in self._stored(live_from):
                yield event
            skip = max(0, self.position - live_from)
            self.position = max(self.position, live_from)
            async for item in self._queued(subscription, deadline):
                if item is None:
                    yield ": keepalive\n\n"
                    continue
                stream, data = item
                if skip:
                    cut = min(skip, len(data))
                    data, skip = data[cut:], skip - cut
                for event in self._output_events(stream, data):
                    yield event
        finally:
            if subscription.queue in subscription.writer.listeners:
                subscription.writer.listeners.remove(subscription.queue)

    async def _queued(
        self, subscription: Subscription, deadline: float
    ) -> AsyncIterator[tuple[int, bytes] | None]:
        """Yield queued chunks, and None when a keepalive is due."""
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            try:
                item = await asyncio.wait_for(
                    subscription.queue.get(), QUEUE_WAIT_SECONDS
                )
            except TimeoutError:
                running = self.dispatcher.running.get(self.job_id)
                if running is None or running.writer is not subscription.writer:
                    return
                if time.monotonic() - quiet_since >= KEEPALIVE_SECONDS:
                    quiet_since = time.monotonic()
                    yield None
                continue
            if item is None:
                self.closed_writer = subscription.writer
                return
            yield item

    async def _stored(self, end: int | None) -> AsyncIterator[str]:
        while True:
            chunks = await asyncio.to_thread(self._read_stored, end)
            if not chunks:
                return
            for stream, offset, data in chunks:
                # A stored chunk may start past the position, when a write failed.
                self.position = max(self.position, offset)
                for event in self._output_events(stream, data):
                    yield event

    def _read_stored(self, end: int | None) -> list[tuple[int, int, bytes]]:
        chunks: list[tuple[int, int, bytes]] = []
        total = 0
        for chunk in outputs.iter_output_range(
            self.engine, self.job_id, self.position, end
        ):
            chunks.append(chunk)
            total += len(chunk[2])
            if total >= STORED_BATCH_BYTES:
                break
        return chunks

    def _output_events(self, stream: int, data: bytes) -> list[str]:
        if not data:
            return []
        self.position += len(data)
        text = self.decoders[stream].decode(data)
        events = []
        if text:
            name = STREAM_NAMES.get(stream, "out")
            events.append(sse("log", {"s": name, "t": text}, self.position))
        if self.tracker.feed(stream, text):
            now = time.monotonic()
            if now - self.progress_sent_at >= PROGRESS_EVERY_SECONDS:
                self.progress_sent_at = now
                events.append(self._progress_event())
        return events

    def _progress_event(self) -> str:
        estimate = self.tracker.estimate(self.row.started_at, utcnow())
        return sse("progress", estimate.public() if estimate else None)

    def _summary_event(self, force: bool = False) -> str:
        summary = job_summary(self.row)
        if not force and summary == self.sent_summary:
            return ""
        self.sent_summary = summary
        return sse("job", summary)

    async def _load(self) -> Any:
        return await asyncio.to_thread(jobs.get_job_row, self.engine, self.job_id)

    async def _wait_stored(self, live_from: int) -> None:
        deadline = time.monotonic() + STORED_WAIT_SECONDS
        while time.monotonic() < deadline:
            self.row = await self._load()
            if int(self.row.log_bytes) >= live_from:
                return
            await asyncio.sleep(0.1)

    async def _wait_final(self) -> None:
        # The writer closes a moment before the final state is written, or
        # before the job is queued again for another attempt.
        deadline = time.monotonic() + FINAL_WAIT_SECONDS
        while True:
            self.row = await self._load()
            if self.row.state in jobs.FINAL_STATES or time.monotonic() > deadline:
                return
            await asyncio.sleep(0.1)


def _decoder() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")(errors="replace")
