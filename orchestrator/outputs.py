"""Job output: ordered byte chunks per job, tagged by stream."""

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Engine, func, insert, select, update

from orchestrator import db, metrics, models
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

    def __init__(self, engine: Engine, job_id: int, max_bytes: int, attempt: int = 1):
        self._engine = engine
        self._job_id = job_id
        self._attempt = attempt
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

    async def resume(self) -> tuple[int, int]:
        """Continue after the output already stored.

        Returns the stdout and stderr bytes that the current attempt stored.
        """
        seq, offset, sizes = await db.retrying(
            _stored_state, self._engine, self._job_id, self._attempt
        )
        self._seq = seq
        self._offset = offset
        self.total_bytes = offset
        return sizes

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
                        "attempt": self._attempt,
                    }
                )
                self._seq += 1
                self._offset += len(data)
            self._pending = []
            self._pending_bytes = 0
            await db.retrying(_insert_chunks, self._engine, rows)
            metrics.OUTPUT_BYTES.inc(sum(len(row["data"]) for row in rows))

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


def _stored_state(
    engine: Engine, job_id: int, attempt: int
) -> tuple[int, int, tuple[int, int]]:
    o = models.job_output
    with engine.connect() as conn:
        next_seq, total = conn.execute(
            select(
                func.coalesce(func.max(o.c.seq) + 1, 0),
                func.coalesce(func.sum(func.length(o.c.data)), 0),
            ).where(o.c.job_id == job_id)
        ).one()
        rows = conn.execute(
            select(o.c.stream, func.sum(func.length(o.c.data)))
            .where(o.c.job_id == job_id, o.c.attempt == attempt)
            .group_by(o.c.stream)
        ).all()
    sizes = {int(stream): int(size or 0) for stream, size in rows}
    return int(next_seq), int(total), (sizes.get(1, 0), sizes.get(2, 0))


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


def iter_output_range(
    engine: Engine, job_id: int, start: int = 0, end: int | None = None
) -> Iterator[tuple[int, int, bytes]]:
    """Yield (stream, offset, data) for both streams between two byte offsets.

    Offsets count the interleaved output, as the ``offset`` column does, so a
    reader can resume at the offset after the last byte it received.
    """
    o = models.job_output
    with engine.connect() as conn:
        first = conn.execute(
            select(func.max(o.c.seq)).where(o.c.job_id == job_id, o.c.offset <= start)
        ).scalar()
    last_seq = -1 if first is None else int(first) - 1
    while True:
        query = (
            select(o.c.seq, o.c.stream, o.c.offset, o.c.data)
            .where(o.c.job_id == job_id, o.c.seq > last_seq)
            .order_by(o.c.seq)
            .limit(16)
        )
        with engine.connect() as conn:
            rows = conn.execute(query).all()
        if not rows:
            return
        for row in rows:
            last_seq = row.seq
            chunk_start, data = int(row.offset), bytes(row.data)
            if end is not None and chunk_start >= end:
                return
            if chunk_start < start:
                data = data[start - chunk_start :]
                chunk_start = start
            if end is not None:
                data = data[: end - chunk_start]
            if data:
                yield row.stream, chunk_start, data


def read_head(engine: Engine, job_id: int, stream: int, max_bytes: int) -> bytes:
    """Return up to ``max_bytes`` from the start of one stream."""
    o = models.job_output
    data = bytearray()
    with engine.connect() as conn:
        rows = conn.execute(
            select(o.c.data)
            .where(o.c.job_id == job_id, o.c.stream == stream)
            .order_by(o.c.seq)
            .limit(4)
        ).all()
    for row in rows:
        data.extend(row.data)
        if len(data) >= max_bytes:
            break
    return bytes(data[:max_bytes])


def read_tail(engine: Engine, job_id: int, max_bytes: int) -> list[tuple[int, bytes]]:
    """Return the last chunks of both streams, about ``max_bytes``, oldest first."""
    o = models.job_output
    with engine.connect() as conn:
        rows = conn.execute(
            select(o.c.stream, o.c.data)
            .where(o.c.job_id == job_id)
            .order_by(o.c.seq.desc())
            .limit(8)
        ).all()
    chunks: list[tuple[int, bytes]] = []
    total = 0
    for row in rows:
        data = bytes(row.data)
        if total + len(data) > max_bytes:
            chunks.append((row.stream, data[len(data) - (max_bytes - total) :]))
            break
        chunks.append((row.stream, data))
        total += len(data)
    chunks.reverse()
    return chunks
