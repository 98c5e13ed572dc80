"""Tasks for operators: create (idempotent), list, inspect, change, events, logs, retry, cancel."""

from __future__ import annotations

from typing import Any

import marshmallow as ma
from flask import request
from flask.views import MethodView
from marshmallow import validate

from fleet_api import context, lean
from fleet_api.resources.common import TASK_STATUS, InSchema, OutSchema
from fleet_common.errors import InvalidInput
from fleet_common.sweeps import Publish
from fleet_common.tasks import logs, service
from fleet_common.tasks.models import Task

blp = lean.Blueprint("tasks", __name__, url_prefix="/api/v1/tasks", description="Tasks")

LABEL = ma.fields.String(validate=validate.Length(min=1, max=200))


class TaskCreateSchema(InSchema):
    title = ma.fields.String(required=True, validate=validate.Length(min=1, max=500))
    prompt = ma.fields.String(validate=validate.Length(max=1_000_000))
    labels = ma.fields.List(LABEL, validate=validate.Length(max=100))
    priority = ma.fields.Integer(validate=validate.Range(-1_000_000, 1_000_000))
    repo = ma.fields.String(
        allow_none=True, validate=validate.Regexp(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
    )
    clone_url = ma.fields.String(allow_none=True, validate=validate.Length(max=1000))
    requires_pr = ma.fields.Boolean()
    max_retries = ma.fields.Integer(validate=validate.Range(0, 100))
    timeout_secs = ma.fields.Integer(validate=validate.Range(1, 7 * 86400))
    assigned_agent_id = ma.fields.String(allow_none=True, validate=validate.Length(max=40))


class TaskPatchSchema(InSchema):
    priority = ma.fields.Integer(validate=validate.Range(-1_000_000, 1_000_000))
    assigned_agent_id = ma.fields.String(allow_none=True, validate=validate.Length(max=40))


class TaskQuerySchema(InSchema):
    status = ma.fields.List(ma.fields.String(validate=validate.OneOf(TASK_STATUS)))
    agent_id = ma.fields.String()
    repo = ma.fields.String()
    label = ma.fields.String()


class TaskSchema(OutSchema):
    id = ma.fields.String()
    title = ma.fields.String()
    prompt = ma.fields.String()
    labels = ma.fields.List(ma.fields.String())
    requirements = ma.fields.List(ma.fields.String())
    priority = ma.fields.Integer()
    status = ma.fields.String()
    repo = ma.fields.String(allow_none=True)
    clone_url = ma.fields.String(allow_none=True)
    issue_number = ma.fields.Integer(allow_none=True)
    requires_pr = ma.fields.Boolean()
    source = ma.fields.String()
    max_retries = ma.fields.Integer()
    timeout_secs = ma.fields.Integer()
    assigned_agent_id = ma.fields.String(allow_none=True)
    agent_id = ma.fields.String(allow_none=True)
    attempt = ma.fields.Integer()
    lease_expires_at = ma.fields.DateTime(allow_none=True)
    not_before = ma.fields.DateTime(allow_none=True)
    failure_reason = ma.fields.String(allow_none=True)
    last_error = ma.fields.String(allow_none=True)
    receipt = ma.fields.Dict(allow_none=True)
    artifacts = ma.fields.List(ma.fields.Dict())
    created_at = ma.fields.DateTime()
    updated_at = ma.fields.DateTime()
    dispatched_at = ma.fields.DateTime(allow_none=True)
    started_at = ma.fields.DateTime(allow_none=True)
    finished_at = ma.fields.DateTime(allow_none=True)


class CreatedTaskSchema(TaskSchema):
    warnings = ma.fields.List(ma.fields.String())


class EventSchema(OutSchema):
    seq = ma.fields.Integer()
    type = ma.fields.String()
    from_status = ma.fields.String(allow_none=True)
    to_status = ma.fields.String(allow_none=True)
    actor = ma.fields.String()
    data = ma.fields.Dict()
    at = ma.fields.DateTime()


class LogQuerySchema(InSchema):
    offset = ma.fields.Integer(load_default=0, validate=validate.Range(min=0))


class LogSliceSchema(OutSchema):
    offset = ma.fields.Integer()
    next_offset = ma.fields.Integer()
    data = ma.fields.String()
    complete = ma.fields.Boolean()


_created = lean.dumper(CreatedTaskSchema)


def wake(task: Task) -> None:
    """Publish the task's wake-up after this request commits."""
    context.publish_after_commit([Publish.of(task)])


def wake_if_served(task: Task) -> None:
    """:func:`wake` if a worker's agent could claim ``task`` (pull agents poll)."""
    if service.worker_could_claim(context.session(), task):
        wake(task)


@blp.route("")
class Tasks(MethodView):
    # The token's read, an Idempotency-Key's lookup, one statement inserting the task with its
    # event: each atomic on its own. (A task linked to an issue is made by the unit of work,
    # for the Forgejo write-back: this schema takes no issue_number.)
    @context.admin_statements
    @blp.arguments(TaskCreateSchema)
    @blp.response(201, CreatedTaskSchema)
    @blp.alt_response(200, schema=CreatedTaskSchema, description="Idempotent replay")
    def post(self, body: dict[str, Any]) -> Any:
        """Create a task (``Idempotency-Key``: same key and body → the same task)."""
        key = request.headers.get("Idempotency-Key")
        if key is not None and not 0 < len(key) <= 200:
            raise InvalidInput("Idempotency-Key: 1 to 200 characters")
        settings = context.fleet().settings
        created = service.create_task(
            context.session(),
            settings,
            body,
            actor=context.principal().actor,
            idempotency_key=key,
        )
        if created.created and created.woken:
            wake(created.task)
        reply = _created(created.task, warnings=created.warnings)
        return lean.reply(reply, 201 if created.created else 200)

    @context.admin
    @blp.arguments(TaskQuerySchema, location="query")
    @blp.response(200, TaskSchema(many=True))
    @blp.paginate(page_size=50, max_page_size=500)
    def get(self, query: dict[str, Any], pagination_parameters: Any) -> Any:
        """List tasks, newest first; filter by status (repeatable), agent, repo, label."""
        items, total = service.list_tasks(
            context.session(),
            status=query.get("status") or (),
            agent_id=query.get("agent_id"),
            repo=query.get("repo"),
            label=query.get("label"),
            page=pagination_parameters.page,
            page_size=pagination_parameters.page_size,
        )
        pagination_parameters.item_count = total
        return items


@blp.route("/<task_id>")
class TaskItem(MethodView):
    @context.admin
    @blp.response(200, TaskSchema)
    def get(self, task_id: str) -> Any:
        """Inspect a task."""
        return service.get_task(context.session(), task_id)

    @context.admin
    @blp.arguments(TaskPatchSchema)
    @blp.response(200, TaskSchema)
    def patch(self, body: dict[str, Any], task_id: str) -> Any:
        """Change priority or assignment while the task is queued."""
        task = service.update_task(
            context.session(), task_id, body, actor=context.principal().actor
        )
        wake_if_served(task)
        return task


@blp.route("/<task_id>/events")
class TaskEvents(MethodView):
    @context.admin
    @blp.response(200, EventSchema(many=True))
    def get(self, task_id: str) -> Any:
        """The task's event history, oldest first."""
        return service.task_events(context.session(), task_id)


@blp.route("/<task_id>/logs")
class TaskLogs(MethodView):
    @context.admin
    @blp.arguments(LogQuerySchema, location="query")
    @blp.response(200, LogSliceSchema)
    def get(self, query: dict[str, Any], task_id: str) -> Any:
        """The stored log from a byte offset."""
        s = context.session()
        return logs.read(s, service.get_task(s, task_id), query["offset"])


@blp.route("/<task_id>/retry")
class TaskRetry(MethodView):
    @context.admin
    @blp.response(200, TaskSchema)
    def post(self, task_id: str) -> Any:
        """Queue a failed task again now, with a fresh retry budget."""
        task = service.retry_task(context.session(), task_id, actor=context.principal().actor)
        wake_if_served(task)
        return task


@blp.route("/<task_id>/cancel")
class TaskCancel(MethodView):
    @context.admin
    @blp.response(200, TaskSchema)
    def post(self, task_id: str) -> Any:
        """Cancel a task; a running agent is told in its next reply."""
        return service.cancel_task(context.session(), task_id, actor=context.principal().actor)
