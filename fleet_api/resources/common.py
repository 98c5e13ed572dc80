"""Schema building blocks shared by the resources."""

from __future__ import annotations

import marshmallow as ma
from marshmallow import validate

from fleet_common.agents.models import DesiredState
from fleet_common.tasks.models import TaskStatus

ID = ma.fields.String(validate=validate.Length(min=1, max=40))


class InSchema(ma.Schema):
    """Request bodies: unknown fields are ignored, so older servers accept newer agents."""

    class Meta:
        unknown = ma.EXCLUDE


class OutSchema(ma.Schema):
    class Meta:
        ordered = True


TASK_STATUS = [s.value for s in TaskStatus]
DESIRED_STATES = [s.value for s in DesiredState]


class Extended:
    """A model object with extra response fields (``warnings``, a shown-once ``token``)."""

    def __init__(self, obj: object, **extra: object) -> None:
        self._obj = obj
        self.__dict__.update(extra)

    def __getattr__(self, name: str) -> object:
        return getattr(self._obj, name)
