"""Job output: ordered byte chunks per job, tagged by stream."""

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Engine, func, insert, select, update

from orchestrator import models
from orchestrator.transports.base import STDERR

logger = logging.getLogger(__name__)

CHUNK_BYTES = 256 * 1024
FLUSH_BYTES = 1 << 20
FLUSH_INTERVAL_SECONDS = 0.25
TRUNCATED_MARKER = b"\n[jobbalancer: output truncated at %d bytes]\n"


class OutputWriter:
    """Buffer one job's output and write it to SQL in ordered chunks.

    Memory stays bounded: ``write`` waits for a flush once FLUSH_BYTES are
    pending, which in turn stops reading from the worker.
    """

    def __init__(self, engine: Engine, job_id: int, max_bytes: int):
        self._engine = engine
        self._job_id = job_id
        self._max_bytes = max_bytes
        self._pending: list[tuple[int, bytearray]] = []
        self._pending_bytes = 0
        self._seq = 0
        self._offset = 0
        self._lock = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._flush_task: asyncio.Task[None] | None = None
        self.total_bytes = 0
        self.truncated = False
        self.listeners: list[asyncio.Queue[tuple[int, bytes] | None]] = []

    async def write(self, stream: int, data: bytes) -> None:
        """Append output from one stream."""
        if self.truncated:
            return
        room = self._max_bytes - self.total_bytes
        if len(data) > room:
            data = data[:room]
            self.truncated = True
        self.total_bytes += len(data)
        self._append(stream, data)
        if self.truncated:
            self._append(STDERR, TRUNCATED_MARKER % self._max_bytes)
        for queue in self.listeners:
            queue.put_nowait((stream, data))
        if self._pending_bytes >= FLUSH_BYTES:
            await self.flush()
        elif self._timer is None and self._pending:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(FLUSH_INTERVAL_SECONDS, self._flush_soon)

    async def flush(self) -> None:
        """Write pending chunks to the database."""
        async with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not self._pending:
                return
            rows = []
            for stream, data in self._pending:
                rows.append(
                    {
                        "job_id": self._job_id,
                        "seq": self._seq,
                        "stream": stream,
                        "offset": self._offset,
                        "data": bytes(data),
                    }
                )
                self._seq += 1
                self._offset += len(data)
            self._pending = []
            self._pending_bytes = 0
            await asyncio.to_thread(_insert_chunks, self._engine, rows)

    async def close(self) -> None:
        """Flush what is left and wake the listeners."""
        if self._flush_task is not None:
            await self._flush_task
        await self.flush()
        for queue in self.listeners:
            queue.put_nowait(None)

    def _append(self, stream: int, data: bytes) -> None:
        if not data:
            return
        if self._pending and self._pending[-1][0] == stream:
            last = self._pending[-1][1]
            if len(last) + len(data) <= CHUNK_BYTES:
                last.extend(data)
                self._pending_bytes += len(data)
                return
        for start in range(0, len(data), CHUNK_BYTES):
            piece = bytearray(data[start : start + CHUNK_BYTES])
            self._pending.append((stream, piece))
            self._pending_bytes += len(piece)

    def _flush_soon(self) -> None:
        self._timer = None
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.ensure_future(self._flush_logged())

    async def _flush_logged(self) -> None:
        try:
            await self.flush()
        except Exception:
            logger.exception("Writing output of job %d failed", self._job_id)


def _insert_chunks(engine: Engine, rows: list[dict[str, Any]]) -> None:
    total = sum(len(row["data"]) for row in rows)
    with engine.begin() as conn:
        conn.execute(insert(models.job_output), rows)
        conn.execute(
            update(models.jobs)
            .where(models.jobs.c.id == rows[0]["job_id"])
            .values(log_bytes=models.jobs.c.log_bytes + total)
        )


def iter_output(
    engine: Engine, job_id: int, stream: int | None = None, offset: int = 0
) -> Iterator[tuple[int, bytes]]:
    """Yield (stream, data) chunks of a job in arrival order.

    ``offset`` counts bytes of the selected stream (or of both when None).
    """
    o = models.job_output
    last_seq = -1
    skipped = 0
    while True:
        query = (
            select(o.c.seq, o.c.stream, o.c.data)
            .where(o.c.job_id == job_id, o.c.seq > last_seq)
            .order_by(o.c.seq)
            .limit(16)
        )
        if stream is not None:
            query = query.where(o.c.stream == stream)
        with engine.connect() as conn:
            rows = conn.execute(query).all()
        if not rows:
            return
        for row in rows:
            last_seq = row.seq
            data = bytes(row.data)
            if skipped < offset:
                cut = min(offset - skipped, len(data))
                skipped += cut
                data = data[cut:]
            if data:
                yield row.stream, data


def output_size(engine: Engine, job_id: int, stream: int | None = None) -> int:
    """Return the stored output size of a job in bytes."""
    o = models.job_output
    query = select(func.coalesce(func.sum(func.length(o.c.data)), 0)).where(
        o.c.job_id == job_id
    )
    if stream is not None:
        query = query.where(o.c.stream == stream)
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())
