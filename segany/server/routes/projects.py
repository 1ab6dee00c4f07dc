"""Projects and their label sets."""
from __future__ import annotations

from typing import Any, Dict, List

from fastapi import APIRouter

from ..deps import Ctx, User
from ..schemas import LabelIn, ProjectIn

router = APIRouter(tags=["projects"])


@router.get("/api/projects", summary="List projects")
def list_projects(ctx: Ctx) -> List[Dict[str, Any]]:
    return ctx.storage.projects()


@router.post("/api/projects", status_code=201, summary="Create a project")
def create_project(body: ProjectIn, ctx: Ctx, user: User) -> Dict[str, Any]:
    name = body.name.strip()
    if not name:
        raise ValueError("project name is empty")
    return ctx.storage.create_project(name, user)


@router.get("/api/projects/{project_id}", summary="One project")
def get_project(project_id: int, ctx: Ctx) -> Dict[str, Any]:
    return ctx.storage.project(project_id)


@router.get("/api/projects/{project_id}/revision", summary="Change counter (poll it to see other tabs' saves)")
def get_revision(project_id: int, ctx: Ctx) -> Dict[str, int]:
    return {"revision": ctx.storage.revision(project_id)}


@router.get("/api/projects/{project_id}/labels", summary="The project's label set")
def list_labels(project_id: int, ctx: Ctx) -> List[Dict[str, Any]]:
    return ctx.storage.labels(project_id)


@router.post("/api/projects/{project_id}/labels", status_code=201, summary="Add a label (or get the existing one)")
def add_label(project_id: int, body: LabelIn, ctx: Ctx) -> Dict[str, Any]:
    name = body.name.strip()
    if not name:
        raise ValueError("label name is empty")
    return ctx.storage.add_label(project_id, name, body.color)
