"""Rotate a stored SSH key: install a new key on its workers, switch, remove the old.

Each worker goes through these steps, and a failure stops only that worker:

1. install: append the new public key to the worker's authorized_keys over the
   connection that still logs in with the old key;
2. verify: log in once with the new key on a fresh connection;
3. switch: the worker's record points at the new key (all workers at once);
4. clean up: remove the old public key from authorized_keys over a
   connection that logs in with the new key.

A worker that fails before the switch keeps the old key (pinned to it when it
used the old key as the default key), so the old key is deleted only when no
worker uses it any more.
"""

import asyncio
import dataclasses
import logging
import secrets
import shlex
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncssh
from sqlalchemy import Engine, update

from orchestrator import keys, models
from orchestrator.dispatch import Dispatcher
from orchestrator.exceptions import ConflictError, InvalidInputError
from orchestrator.timeutil import isoformat, utcnow
from orchestrator.transports.base import TransportError
from orchestrator.transports.ssh import SshTransport

logger = logging.getLogger(__name__)

DEFAULT_AUTHORIZED_KEYS = ".ssh/authorized_keys"
REMOTE_COMMAND_TIMEOUT_SECONDS = 30
# Rotations kept in memory for GET /api/v1/keys/rotations.
KEPT_ROTATIONS = 50

# Appends the public key line read from stdin unless the key is present.
INSTALL_SCRIPT = """\
f={path}; blob={blob}
umask 077
mkdir -p "$(dirname "$f")" && touch "$f" || exit 1
line=$(cat)
if grep -qF -e "$blob" "$f"; then exit 0; fi
if [ -s "$f" ] && [ -n "$(tail -c 1 "$f")" ]; then echo >> "$f"; fi
printf '%s\\n' "$line" >> "$f"
"""

# Drops every line that contains the key. Writing through `cat >` keeps the
# file's inode, owner and mode.
REMOVE_SCRIPT = """\
f={path}; blob={blob}
umask 077
[ -f "$f" ] || exit 0
grep -qF -e "$blob" "$f" || exit 0
tmp="$f.jobbalancer.$$"
grep -vF -e "$blob" "$f" > "$tmp"
cat "$tmp" > "$f"; rc=$?
rm -f "$tmp"
exit $rc
"""


@dataclass
class WorkerProgress:
    """Progress of one worker in a rotation."""

    worker_id: int
    name: str
    # "assigned" or "default", as in keys.KeyUser.
    via: str
    # waiting, installing, verifying, verified, switched, done or failed.
    state: str = "waiting"
    detail: str | None = None
    # (host, port, username): workers on one account share an authorized_keys.
    account: tuple[str, int, str] = ("", 0, "")

    def public(self) -> dict[str, Any]:
        """Build the JSON form of the worker's progress."""
        return {
            "worker": self.name,
            "via": self.via,
            "state": self.state,
            "detail": self.detail,
        }


@dataclass
class Rotation:
    """One rotation of a stored key, with per-worker progress."""

    id: str
    old_key: keys.KeyRecord
    new_key: keys.KeyRecord
    authorized_keys_file: str
    delete_old: bool
    workers: list[WorkerProgress] = field(default_factory=list)
    # running, succeeded (every worker moved), partial or failed.
    state: str = "running"
    detail: str | None = None
    started_at: datetime = field(default_factory=utcnow)
    finished_at: datetime | None = None
    old_key_deleted: bool = False
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    # Workers on one account share an authorized_keys file, so their edits of
    # it take turns.
    account_locks: dict[tuple[str, int, str], asyncio.Lock] = field(
        default_factory=dict, repr=False
    )

    def lock_for(self, account: tuple[str, int, str]) -> asyncio.Lock:
        """Return the lock that orders edits of one account's authorized_keys."""
        return self.account_locks.setdefault(account, asyncio.Lock())

    def public(self) -> dict[str, Any]:
        """Build the JSON form of the rotation."""
        return {
            "id": self.id,
            "old_key": self.old_key.name,
            "new_key": self.new_key.name,
            "new_public_key": self.new_key.public_key,
            "new_fingerprint": self.new_key.fingerprint,
            "authorized_keys_file": self.authorized_keys_file,
            "state": self.state,
            "detail": self.detail,
            "old_key_deleted": self.old_key_deleted,
            "started_at": isoformat(self.started_at),
            "finished_at": isoformat(self.finished_at),
            "workers": [progress.public() for progress in self.workers],
        }


class RotationRegistry:
    """The rotations this server process started, newest last.

    NOTE: rotations live in memory only. When the server stops mid-rotation,
    a key that no worker uses may stay in the store and in authorized_keys
    files. `jobbalancer key list` shows such keys, and they can be deleted.
    """

    def __init__(self) -> None:
        self.rotations: dict[str, Rotation] = {}

    def running_for(self, key_name: str) -> Rotation | None:
        """Return the unfinished rotation of ``key_name``, if any."""
        for rotation in self.rotations.values():
            if rotation.state == "running" and rotation.old_key.name == key_name:
                return rotation
        return None

    def add(self, rotation: Rotation) -> None:
        """Keep ``rotation`` and drop the oldest finished ones past the limit."""
        self.rotations[rotation.id] = rotation
        finished = [r for r in self.rotations.values() if r.state != "running"]
        for old in finished[: max(0, len(self.rotations) - KEPT_ROTATIONS)]:
            del self.rotations[old.id]


async def start_rotation(
    registry: RotationRegistry,
    dispatcher: Dispatcher,
    master_key: bytes,
    old_name: str,
    *,
    new_name: str | None = None,
    key_type: str | None = None,
    authorized_keys_file: str = DEFAULT_AUTHORIZED_KEYS,
    delete_old: bool = True,
) -> Rotation:
    """Create the new key and start rotating ``old_name`` in the background."""
    engine = dispatcher.engine
    if registry.running_for(old_name) is not None:
        raise ConflictError(f"SSH key {old_name!r} is already being rotated")
    _check_authorized_keys_file(authorized_keys_file)

    old = await asyncio.to_thread(keys.get_key, engine, old_name)
    if key_type is None:
        key_type = "rsa" if old.key_type == "ssh-rsa" else "ed25519"
    new_name = new_name or _next_name(old.name)
    new = await asyncio.to_thread(
        keys.generate_key,
        engine,
        master_key,
        new_name,
        key_type,
        make_default=False,
    )

    users = await asyncio.to_thread(keys.key_users, engine, old)
    rotation = Rotation(
        id=secrets.token_hex(8),
        old_key=old,
        new_key=new,
        authorized_keys_file=authorized_keys_file,
        delete_old=delete_old,
        workers=[WorkerProgress(u.worker_id, u.name, u.via) for u in users],
    )
    registry.add(rotation)
    logger.info(
        "Rotating SSH key %s to %s on %d worker(s)",
        old.name,
        new.name,
        len(users),
        extra={"event": "key_rotation_started", "key": old.name},
    )
    rotation.task = asyncio.ensure_future(_run(rotation, dispatcher, master_key))
    return rotation


def _next_name(old_name: str) -> str:
    stamp = utcnow().strftime("%Y%m%d%H%M%S")
    return f"{old_name[: 64 - len(stamp) - 1]}-{stamp}"


def _check_authorized_keys_file(path: str) -> None:
    if not path or "\n" in path or "\0" in path:
        raise InvalidInputError(
            "authorized_keys_file must be a file path, for example "
            f"{DEFAULT_AUTHORIZED_KEYS} (relative to the worker's home folder)",
            field="authorized_keys_file",
        )


async def _run(rotation: Rotation, dispatcher: Dispatcher, master_key: bytes) -> None:
    try:
        new_key = await asyncio.to_thread(
            keys.load_private_key, dispatcher.engine, master_key, rotation.new_key.id
        )
        await asyncio.gather(
            *(_install(rotation, dispatcher, p, new_key) for p in rotation.workers)
        )
        await asyncio.to_thread(_switch, dispatcher.engine, rotation)
        await dispatcher.refresh_workers()
        await asyncio.gather(
            *(_clean_up(rotation, dispatcher, p) for p in rotation.workers)
        )
        await asyncio.to_thread(_finish, dispatcher.engine, rotation)
    except Exception as exc:
        logger.exception(
            "Rotation of SSH key %s failed",
            rotation.old_key.name,
            extra={"event": "key_rotation_failed", "key": rotation.old_key.name},
        )
        rotation.state = "failed"
        rotation.detail = f"internal error: {exc}"
    finally:
        rotation.finished_at = utcnow()
    logger.info(
        "Rotation of SSH key %s to %s ended %s",
        rotation.old_key.name,
        rotation.new_key.name,
        rotation.state,
        extra={"event": "key_rotation_finished", "key": rotation.old_key.name},
    )


async def _install(
    rotation: Rotation,
    dispatcher: Dispatcher,
    progress: WorkerProgress,
    new_key: asyncssh.SSHKey,
) -> None:
    runtime = dispatcher.workers.get(progress.worker_id)
    if runtime is None or not isinstance(runtime.transport, SshTransport):
        _fail(progress, "the worker is gone or does not use SSH")
        return
    transport = runtime.transport
    target = transport.target
    progress.account = (target.host, target.port, target.username)

    progress.state = "installing"
    script = INSTALL_SCRIPT.format(
        path=_shell_path(rotation.authorized_keys_file),
        blob=shlex.quote(_key_blob(rotation.new_key.public_key)),
    )
    line = rotation.new_key.public_key + "\n"
    try:
        async with rotation.lock_for(progress.account):
            result = await transport.run_simple(
                script, stdin=line.encode(), timeout=REMOTE_COMMAND_TIMEOUT_SECONDS
            )
    except (TransportError, asyncssh.Error, OSError) as exc:
        _fail(progress, f"running a command with the old key failed: {exc}")
        return
    if result.exit_status != 0:
        _fail(progress, f"writing authorized_keys failed: {_stderr(result)}")
        return

    progress.state = "verifying"
    probe_target = dataclasses.replace(
        target, client_key=new_key, key_path=None, key_error=None
    )
    probe = SshTransport(probe_target, _ignore_host_key)
    try:
        await probe.check()
    except TransportError as exc:
        _fail(progress, f"login with the new key failed: {exc}")
        return
    finally:
        await probe.close()
    progress.state = "verified"


async def _ignore_host_key(host_key: str) -> None:
    # The probe copies the worker's recorded host key, so it never learns one.
    return None


def _switch(engine: Engine, rotation: Rotation) -> None:
    """Point verified workers at the new key and pin the others to the old one."""
    w, k = models.workers, models.ssh_keys
    old, new = rotation.old_key, rotation.new_key
    with engine.begin() as conn:
        if old.is_default:
            conn.execute(update(k).values(is_default=False))
            conn.execute(update(k).where(k.c.id == new.id).values(is_default=True))
        for progress in rotation.workers:
            moved = progress.state == "verified"
            if moved and progress.via == "assigned":
                key_id = new.id
            elif not moved and progress.via == "default":
                key_id = old.id
            else:
                continue
            conn.execute(
                update(w)
                .where(w.c.id == progress.worker_id)
                .values(key_id=key_id, updated_at=utcnow())
            )
    for progress in rotation.workers:
        if progress.state == "verified":
            progress.state = "switched"


async def _clean_up(
    rotation: Rotation, dispatcher: Dispatcher, progress: WorkerProgress
) -> None:
    if progress.state != "switched":
        return
    sharing = [
        other.name
        for other in rotation.workers
        if other.state == "failed" and other.account == progress.account
    ]
    if sharing:
        progress.state = "done"
        progress.detail = (
            f"old key left in authorized_keys: {', '.join(sharing)} logs in to "
            "the same account with it"
        )
        return
    runtime = dispatcher.workers.get(progress.worker_id)
    if runtime is None or not isinstance(runtime.transport, SshTransport):
        progress.detail = "worker removed before the old key was cleaned up"
        return
    script = REMOVE_SCRIPT.format(
        path=_shell_path(rotation.authorized_keys_file),
        blob=shlex.quote(_key_blob(rotation.old_key.public_key)),
    )
    try:
        async with rotation.lock_for(progress.account):
            result = await runtime.transport.run_simple(
                script, timeout=REMOTE_COMMAND_TIMEOUT_SECONDS
            )
    except TransportError as exc:
        progress.detail = f"switched, but removing the old key failed: {exc}"
        return
    if result.exit_status != 0:
        progress.detail = (
            f"switched, but removing the old key failed: {_stderr(result)}"
        )
        return
    progress.state = "done"


def _finish(engine: Engine, rotation: Rotation) -> None:
    failed = [p.name for p in rotation.workers if p.state == "failed"]
    leftover = [p.name for p in rotation.workers if p.state == "switched"]
    still_used = keys.key_users(engine, keys.get_key(engine, rotation.old_key.id))
    if rotation.delete_old and not still_used:
        keys.delete_key(engine, rotation.old_key.name)
        rotation.old_key_deleted = True
    if failed:
        rotation.state = "partial"
        rotation.detail = (
            f"{len(failed)} worker(s) still use the old key: {', '.join(failed)}; "
            "fix them and rotate again"
        )
    else:
        rotation.state = "succeeded"
        if leftover:
            rotation.detail = (
                "the old key is still in authorized_keys on: " + ", ".join(leftover)
            )


def _fail(progress: WorkerProgress, detail: str) -> None:
    progress.state = "failed"
    progress.detail = detail
    logger.warning(
        "Key rotation step failed on worker %s: %s",
        progress.name,
        detail,
        extra={"event": "key_rotation_worker_failed", "worker": progress.name},
    )


def _shell_path(path: str) -> str:
    # The session starts in the home folder, so relative paths resolve there.
    if path.startswith("~/"):
        path = path[2:]
    return shlex.quote(path)


def _key_blob(public_key_line: str) -> str:
    return public_key_line.split()[1]


def _stderr(result: asyncssh.SSHCompletedProcess) -> str:
    data = result.stderr or b""
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    return text.strip()[-300:] or f"exit status {result.exit_status}"
