"""JSON routes that sync workers with an Ansible inventory and export them (admin)."""

import asyncio
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import PlainTextResponse

from orchestrator import inventory
from orchestrator.api import deps
from orchestrator.exceptions import InvalidInputError

router = APIRouter(prefix="/api/v1")

MAX_INVENTORY_BYTES = 1 << 20
INVENTORY_MEDIA_TYPE = "application/yaml"


@router.get(
    "/inventory",
    tags=["workers"],
    response_class=PlainTextResponse,
    responses={200: {"content": {INVENTORY_MEDIA_TYPE: {}}}},
)
async def export_inventory(
    engine: deps.EngineDep, user: deps.AdminDep
) -> PlainTextResponse:
    """Return the SSH workers as an Ansible YAML inventory file."""
    text = await asyncio.to_thread(inventory.export_inventory, engine)
    return PlainTextResponse(
        text,
        media_type=INVENTORY_MEDIA_TYPE,
        headers={"Content-Disposition": 'attachment; filename="workers.yml"'},
    )


@router.post("/inventory/sync", tags=["workers"])
async def sync_inventory(
    request: Request,
    engine: deps.EngineDep,
    dispatcher: deps.DispatcherDep,
    user: deps.AdminDep,
    dry_run: bool = Query(False, description="Report the changes without writing"),
) -> dict[str, Any]:
    """Create and update workers and classes from an uploaded inventory.

    Send the YAML as the request body, or as the form field ``file`` of a
    multipart upload.
    """
    text = await _read_inventory_text(request)
    parsed = inventory.Inventory.from_yaml(text, "the uploaded inventory")
    report = await asyncio.to_thread(
        lambda: inventory.sync_inventory(engine, parsed, dry_run=dry_run)
    )
    if not dry_run:
        summary = (
            f"{len(report.added)} added, {len(report.changed)} changed, "
            f"{len(report.unchanged)} unchanged"
        )
        await deps.audit(request, user, "inventory.sync", "workers", summary)
        await dispatcher.refresh_workers()
    return report.public()


async def _read_inventory_text(request: Request) -> str:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        upload: Any = form.get("file")
        if upload is None or isinstance(upload, str):
            raise InvalidInputError(
                "the form has no file field: upload the inventory as 'file'",
                field="file",
            )
        data = await upload.read(MAX_INVENTORY_BYTES + 1)
    else:
        data = await request.body()
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
