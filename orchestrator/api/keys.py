"""JSON routes for stored SSH keys, key rotation and worker host keys (admin only)."""

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field

from orchestrator import keys, rotation
from orchestrator.api import deps
from orchestrator.exceptions import NotFoundError

router = APIRouter(prefix="/api/v1")


class KeyCreate(BaseModel):
    """A key pair for the server to generate."""

    name: str = Field(min_length=1, max_length=64)
    type: str = Field(default="ed25519", description="ed25519 or rsa (4096 bits)")
    default: bool | None = Field(
        default=None,
        description="Make it the default key; absent means only when no "
        "default key exists yet",
    )


class KeyImport(BaseModel):
    """An existing private key to store."""

    name: str = Field(min_length=1, max_length=64)
    private_key: str = Field(
        min_length=1, description="OpenSSH or PEM (PKCS#1, PKCS#8) private key text"
    )
    passphrase: str | None = Field(
        default=None, description="Passphrase of an encrypted private key"
    )
    default: bool | None = None


class KeyRotate(BaseModel):
    """Options of a key rotation."""

    new_name: str | None = Field(
        default=None, description="Name of the new key; default: old name and a time"
    )
    type: str | None = Field(
        default=None, description="ed25519 or rsa; default: the old key's type"
    )
    authorized_keys_file: str = Field(
        default=rotation.DEFAULT_AUTHORIZED_KEYS,
        description="authorized_keys path on the workers, relative to the home "
        "folder unless absolute",
    )
    delete_old: bool = Field(
        default=True, description="Delete the old key once no worker uses it"
    )


class WorkerKeyUpdate(BaseModel):
    """The stored key a worker logs in with."""

    key: str | None = Field(
        default=None,
        description="Key name; null means the worker's key file when it has one, "
        "else the default key",
    )


class HostKeyAccept(BaseModel):
    """Confirmation of the pending host key an admin has checked."""

    fingerprint: str | None = Field(
        default=None,
        description="SHA256 fingerprint of the pending key; when given it must match",
    )


def _master_key(settings: Any) -> bytes:
    return keys.load_master_key(settings.data_path())


def rotation_registry(request: Request) -> rotation.RotationRegistry:
    """Return the application's key rotations, creating the registry once."""
    state = request.app.state
    registry = getattr(state, "key_rotations", None)
    if registry is None:
        registry = rotation.RotationRegistry()
        state.key_rotations = registry
    return registry


async def _public_key(engine: Any, record: keys.KeyRecord) -> dict[str, Any]:
    users = await asyncio.to_thread(keys.key_users, engine, record)
    return record.public([user.name for user in users])


@router.get("/keys", tags=["keys"])
async def read_keys(engine: deps.EngineDep, user: deps.AdminDep) -> dict[str, Any]:
    """List stored SSH keys with their public keys and the workers using them."""
    records = await asyncio.to_thread(keys.list_keys, engine)
    items = [await _public_key(engine, record) for record in records]
    return {"keys": items, "total": len(items)}


@router.post("/keys", tags=["keys"], status_code=201)
async def create_key(
    payload: KeyCreate,
    request: Request,
    engine: deps.EngineDep,
    settings: deps.SettingsDep,
    user: deps.AdminDep,
) -> dict[str, Any]:
    """Generate a key pair on the server and store it encrypted."""
    master_key = _master_key(settings)
    record = await asyncio.to_thread(
        lambda: keys.generate_key(
            engine, master_key, payload.name, payload.type, make_default=payload.default
        )
    )
    await deps.audit(
        request, user, "key.generate", f"key {record.name}", record.fingerprint
    )
    return await _public_key(engine, record)


@router.post("/keys/import", tags=["keys"], status_code=201)
async def import_key(
    payload: KeyImport,
    request: Request,
    engine: deps.EngineDep,
    settings: deps.SettingsDep,
    user: deps.AdminDep,
) -> dict[str, Any]:
    """Store an existing private key, decrypting it with its passphrase."""
    master_key = _master_key(settings)
    record = await asyncio.to_thread(
        lambda: keys.import_key(
            engine,
            master_key,
            payload.name,
            payload.private_key,
            payload.passphrase,
            make_default=payload.default,
        )
    )
    await deps.audit(
        request, user, "key.import", f"key {record.name}", record.fingerprint
    )
    return await _public_key(engine, record)


@router.get("/keys/rotations", tags=["keys"])
async def read_rotations(request: Request, user: deps.AdminDep) -> dict[str, Any]:
    """List the key rotations this server process ran, newest first."""
    items = [
        r.public() for r in reversed(rotation_registry(request).rotations.values())
    ]
    return {"rotations": items, "total": len(items)}


@router.get("/keys/rotations/{rotation_id}", tags=["keys"])
async def read_rotation(
    rotation_id: str, request: Request, user: deps.AdminDep
) -> dict[str, Any]:
    """Return a key rotation with the progress of each worker."""
    found = rotation_registry(request).rotations.get(rotation_id)
    if found is None:
        raise NotFoundError(f"key rotation {rotation_id!r} not found")
    return found.public()


@router.get("/keys/{name}", tags=["keys"])
async def read_key(
    name: str, engine: deps.EngineDep, user: deps.AdminDep
) -> dict[str, Any]:
    """Return one stored key and the workers using it."""
    record = await asyncio.to_thread(keys.get_key, engine, name)
    return await _public_key(engine, record)


@router.get("/keys/{name}/public", tags=["keys"], response_class=PlainTextResponse)
async def read_public_key(
    name: str, engine: deps.EngineDep, user: deps.AdminDep
) -> PlainTextResponse:
    """Return the public key as one authorized_keys line, ready to download."""
    record = await asyncio.to_thread(keys.get_key, engine, name)
    return PlainTextResponse(
        record.public_key + "\n",
        headers={"Content-Disposition": f'attachment; filename="{name}.pub"'},
    )


@router.post("/keys/{name}/default", tags=["keys"])
async def make_default_key(
    name: str,
    request: Request,
    engine: deps.EngineDep,
    dispatcher: deps.DispatcherDep,
    user: deps.AdminDep,
) -> dict[str, Any]:
    """Make this key the one that workers without their own key log in with."""
    record = await asyncio.to_thread(keys.set_default_key, engine, name)
    await deps.audit(request, user, "key.default", f"key {name}")
    await dispatcher.refresh_workers()
    return await _public_key(engine, record)


@router.delete("/keys/{name}", tags=["keys"])
async def delete_key(
    name: str, request: Request, engine: deps.EngineDep, user: deps.AdminDep
) -> dict[str, Any]:
    """Delete a key that no worker uses; 409 while workers still use it."""
    await asyncio.to_thread(keys.delete_key, engine, name)
    await deps.audit(request, user, "key.delete", f"key {name}")
    return {"result": True, "name": name, "deleted": True}


@router.post("/keys/{name}/rotate", tags=["keys"], status_code=202)
async def rotate_key(
    name: str,
    payload: KeyRotate,
    request: Request,
    dispatcher: deps.DispatcherDep,
    settings: deps.SettingsDep,
    user: deps.AdminDep,
) -> dict[str, Any]:
    """Start replacing the key on every worker; poll the returned rotation."""
    found = await rotation.start_rotation(
        rotation_registry(request),
        dispatcher,
        _master_key(settings),
        name,
        new_name=payload.new_name,
        key_type=payload.type,
        authorized_keys_file=payload.authorized_keys_file,
        delete_old=payload.delete_old,
    )
    await deps.audit(
        request, user, "key.rotate", f"key {name}", f"new key {found.new_key.name}"
    )
    body = found.public()
    body["url"] = f"/api/v1/keys/rotations/{found.id}"
    return body


@router.put("/workers/{name}/key", tags=["keys"])
async def assign_worker_key(
    name: str,
    payload: WorkerKeyUpdate,
    request: Request,
    engine: deps.EngineDep,
    dispatcher: deps.DispatcherDep,
    user: deps.AdminDep,
) -> dict[str, Any]:
    """Give a worker its own stored key, or null for the default key."""
    await asyncio.to_thread(keys.assign_key, engine, name, payload.key)
    await deps.audit(
        request, user, "worker.key", f"worker {name}", payload.key or "default key"
    )
    await dispatcher.refresh_workers()
    return {"worker": name, "key": payload.key}


@router.get("/workers/{name}/host-key", tags=["keys"])
async def read_host_key(
    name: str, engine: deps.EngineDep, user: deps.AdminDep
) -> dict[str, Any]:
    """Return the recorded host key and any changed key waiting for acceptance."""
    return await asyncio.to_thread(keys.host_key_state, engine, name)


@router.post("/workers/{name}/accept-host-key", tags=["keys"])
async def accept_host_key(
    name: str,
    request: Request,
    engine: deps.EngineDep,
    dispatcher: deps.DispatcherDep,
    user: deps.AdminDep,
    payload: HostKeyAccept | None = None,
) -> dict[str, Any]:
    """Trust the worker's changed host key and bring the worker back."""
    fingerprint = payload.fingerprint if payload is not None else None
    state = await asyncio.to_thread(keys.accept_host_key, engine, name, fingerprint)
    await deps.audit(
        request, user, "worker.accept_host_key", f"worker {name}", state["fingerprint"]
    )
    await dispatcher.refresh_workers()
    return state
