"""SSH key pages: stored keys, generate, import, default, rotate, delete.

Also the inventory page under /workers, which syncs workers from an uploaded
Ansible inventory and exports them.
"""

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse
from sqlalchemy import Engine

from orchestrator import inventory, keys, rotation
from orchestrator.api import deps
from orchestrator.api import keys as keys_api
from orchestrator.api.inventory import MAX_INVENTORY_BYTES
from orchestrator.exceptions import InvalidInputError, JobBalancerError
from orchestrator.ui import common, forms

router = APIRouter(route_class=common.PageRoute, include_in_schema=False)

# Seconds between reloads of a rotation page while the rotation runs.
ROTATION_REFRESH_SECONDS = 2


def _load_keys(engine: Engine) -> list[dict[str, Any]]:
    rows = []
    for record in keys.list_keys(engine):
        users = [user.name for user in keys.key_users(engine, record)]
        rows.append(record.public(users))
    return rows


async def _render_keys(
    request: Request,
    engine: Engine,
    values: dict[str, Any] | None = None,
    errors: dict[str, str] | None = None,
    status_code: int = 200,
) -> Response:
    rows = await asyncio.to_thread(_load_keys, engine)
    context = {
        "title": "SSH keys",
        "rows": rows,
        "key_types": tuple(keys.KEY_TYPES),
        "values": values or {"type": "ed25519"},
        "errors": errors or {},
        "default_authorized_keys": rotation.DEFAULT_AUTHORIZED_KEYS,
    }
    return common.render(request, "keys.html", context, status_code=status_code)


@router.get("/keys")
async def keys_page(
    request: Request, user: common.AdminUser, engine: deps.EngineDep
) -> Response:
    """List stored keys with their public keys, fingerprints and workers."""
    return await _render_keys(request, engine)


@router.get("/keys/{name}.pub")
async def download_public_key(
    name: str, user: common.AdminUser, engine: deps.EngineDep
) -> PlainTextResponse:
    """Download a public key as one authorized_keys line."""
    record = await asyncio.to_thread(keys.get_key, engine, name)
    return PlainTextResponse(
        record.public_key + "\n",
        headers={"Content-Disposition": f'attachment; filename="{name}.pub"'},
    )


@router.post("/keys/generate")
async def generate_key(
    request: Request,
    user: common.AdminUser,
    engine: deps.EngineDep,
    settings: deps.SettingsDep,
    form: forms.CheckedForm,
) -> Response:
    """Generate a key pair on the server."""
    try:
        name = form.text("name", required=True, max_length=64)
        key_type = form.text("type") or "ed25519"
        make_default = True if form.checkbox("default") else None
        master_key = keys.load_master_key(settings.data_path())
        record = await asyncio.to_thread(
            lambda: keys.generate_key(
                engine, master_key, name, key_type, make_default=make_default
            )
        )
    except JobBalancerError as exc:
        errors = {f"generate_{exc.field or 'form'}": exc.detail}
        return await _render_keys(
            request, engine, form.values(), errors, exc.status_code
        )
    await forms.record(
        request, user, "key.generate", f"key {record.name}", record.fingerprint
    )
    return forms.action_done(request, f"Generated key {record.name}.", "/keys")


@router.post("/keys/import")
async def import_key(
    request: Request,
    user: common.AdminUser,
    engine: deps.EngineDep,
    settings: deps.SettingsDep,
    form: forms.CheckedForm,
) -> Response:
    """Store an existing private key."""
    try:
        name = form.text("import_name", required=True, max_length=64)
        private_key = form.raw("private_key")
        if not private_key.strip():
            raise InvalidInputError("paste a private key", field="private_key")
        passphrase = str(form.form.get("passphrase") or "") or None
        make_default = True if form.checkbox("import_default") else None
        master_key = keys.load_master_key(settings.data_path())
        record = await asyncio.to_thread(
            lambda: keys.import_key(
                engine,
                master_key,
                name,
                private_key,
                passphrase,
                make_default=make_default,
            )
        )
    except JobBalancerError as exc:
        values = form.values()
        values.pop("private_key", None)
        errors = {f"import_{exc.field or 'form'}": exc.detail}
        return await _render_keys(request, engine, values, errors, exc.status_code)
    await forms.record(
        request, user, "key.import", f"key {record.name}", record.fingerprint
    )
    return forms.action_done(request, f"Imported key {record.name}.", "/keys")


@router.post("/keys/{name}/default")
async def make_default(
    name: str,
    request: Request,
    user: common.AdminUser,
    engine: deps.EngineDep,
    dispatcher: deps.DispatcherDep,
    form: forms.CheckedForm,
) -> Response:
    """Make a key the one that workers without their own key log in with."""
    await asyncio.to_thread(keys.set_default_key, engine, name)
    await dispatcher.refresh_workers()
    await forms.record(request, user, "key.default", f"key {name}")
    return forms.action_done(request, f"Key {name} is now the default key.", "/keys")


@router.post("/keys/{name}/delete")
async def delete_key(
    name: str,
    request: Request,
    user: common.AdminUser,
    engine: deps.EngineDep,
    form: forms.CheckedForm,
) -> Response:
    """Delete a key that no worker uses."""
    if not form.confirmed():
        return forms.confirm_page(
            request,
            f"Delete key {name}?",
            "The private key is gone for good after this.",
            "Delete key",
            "/keys",
        )
    await asyncio.to_thread(keys.delete_key, engine, name)
    await forms.record(request, user, "key.delete", f"key {name}")
    return forms.action_done(request, f"Deleted key {name}.", "/keys")


@router.post("/keys/{name}/rotate")
async def rotate_key(
    name: str,
    request: Request,
    user: common.AdminUser,
    dispatcher: deps.DispatcherDep,
    settings: deps.SettingsDep,
    form: forms.CheckedForm,
) -> Response:
    """Start a rotation and open its progress page."""
    path = form.text("authorized_keys_file") or rotation.DEFAULT_AUTHORIZED_KEYS
    if not form.confirmed():
        return forms.confirm_page(
            request,
            f"Rotate key {name}?",
            "A new key is installed on every worker that uses this one, the "
            f"workers switch to it, and the old key is removed from {path}.",
            "Rotate key",
            "/keys",
            fields={"authorized_keys_file": path},
        )
    started = await rotation.start_rotation(
        keys_api.rotation_registry(request),
        dispatcher,
        keys.load_master_key(settings.data_path()),
        name,
        authorized_keys_file=path,
    )
    await forms.record(
        request, user, "key.rotate", f"key {name}", f"new key {started.new_key.name}"
    )
    url = f"/keys/rotations/{started.id}"
    return forms.action_done(request, f"Rotating key {name}.", url, data={"url": url})


@router.get("/keys/rotations/{rotation_id}")
async def rotation_page(
    rotation_id: str, request: Request, user: common.AdminUser
) -> Response:
    """Show a rotation's progress per worker; the page reloads while it runs."""
    found = keys_api.rotation_registry(request).rotations.get(rotation_id)
    if found is None:
        return common.error_response(
            request, 404, f"key rotation {rotation_id} not found"
        )
    context = {
        "title": f"Rotating key {found.old_key.name}",
        "rotation": found.public(),
        "refresh_seconds": ROTATION_REFRESH_SECONDS,
    }
    return common.render(request, "key_rotation.html", context)


@router.get("/workers/inventory")
async def inventory_page(request: Request, user: common.AdminUser) -> Response:
    """Show the inventory upload form and the export link."""
    return common.render(
        request,
        "inventory.html",
        {"title": "Worker inventory", "report": None, "error": None},
    )


@router.get("/workers/inventory.yml")
async def export_inventory(
    user: common.AdminUser, engine: deps.EngineDep
) -> PlainTextResponse:
    """Download the SSH workers as an Ansible YAML inventory."""
    text = await asyncio.to_thread(inventory.export_inventory, engine)
    return PlainTextResponse(
        text,
        media_type="application/yaml",
        headers={"Content-Disposition": 'attachment; filename="workers.yml"'},
    )


@router.post("/workers/inventory")
async def sync_inventory(
    request: Request,
    user: common.AdminUser,
    engine: deps.EngineDep,
    dispatcher: deps.DispatcherDep,
    form: forms.CheckedForm,
) -> Response:
    """Sync workers and classes from an uploaded inventory and show the report."""
    dry_run = form.checkbox("dry_run")
    try:
        text = await _uploaded_text(form)
        parsed = inventory.Inventory.from_yaml(text, "the uploaded inventory")
        report = await asyncio.to_thread(
            lambda: inventory.sync_inventory(engine, parsed, dry_run=dry_run)
        )
    except JobBalancerError as exc:
        failed = {"title": "Worker inventory", "report": None, "error": exc.detail}
        return common.render(
            request, "inventory.html", failed, status_code=exc.status_code
        )
    if not dry_run:
        summary = report.lines()[-1]
        await forms.record(request, user, "inventory.sync", "workers", summary)
        await dispatcher.refresh_workers()
    context = {"title": "Worker inventory", "report": report, "error": None}
    return common.render(request, "inventory.html", context)


async def _uploaded_text(form: forms.FormInput) -> str:
    upload: Any = form.form.get("file")
    if upload is None or isinstance(upload, str) or not upload.filename:
        raise InvalidInputError("choose an inventory file to upload", field="file")
    data = await upload.read(MAX_INVENTORY_BYTES + 1)
    if len(data) > MAX_INVENTORY_BYTES:
        raise InvalidInputError(
            f"the inventory is larger than {MAX_INVENTORY_BYTES} bytes", field="file"
        )
    try:
        return bytes(data).decode()
    except UnicodeDecodeError as exc:
        raise InvalidInputError(
            "the inventory is not UTF-8 text", field="file"
        ) from exc
