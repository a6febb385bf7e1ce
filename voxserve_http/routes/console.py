"""The web console: one page at ``/`` and its assets under ``/console/``, files of the
package (no build step, no CDN: the gateway serves everything the page loads)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

CONSOLE_DIR = Path(__file__).resolve().parent.parent / "console"
ASSETS_URL = "/console"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    # no-cache: a browser asks again (a 304 when unchanged), so an upgraded gateway's page is seen at once
    return FileResponse(CONSOLE_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def mount_assets(app: FastAPI) -> None:
    app.mount(ASSETS_URL, StaticFiles(directory=CONSOLE_DIR), name="console")
