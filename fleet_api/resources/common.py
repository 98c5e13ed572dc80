"""Schema building blocks shared by the resources."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import marshmallow as ma
from marshmallow import validate

from fleet_common.agents.models import DesiredState
from fleet_common.tasks.models import TaskStatus

ID = ma.fields.String(validate=validate.Length(min=1, max=40))


class InSchema(ma.Schema):
    """Request bodies: unknown fields are ignored, so older servers accept newer agents."""

    class Meta:
        unknown = ma.EXCLUDE

    @ma.pre_load
    def _storable(self, data: Any, **_kwargs: Any) -> Any:
        """Refuse what marshmallow lets through but should not: a fraction for an integer
        (Integer truncates 1.5 to 1) and NUL characters (PostgreSQL text and JSONB refuse them,
        which would surface as a 500)."""
        if not isinstance(data, Mapping):
            return data
        for name, field in self.load_fields.items():
            key = field.data_key or name
            value = data.get(key)
            fraction = isinstance(value, float) and not value.is_integer()
            if isinstance(field, ma.fields.Integer) and fraction:
                raise ma.ValidationError("Not a valid integer.", field_name=key)
            if _has_nul(value):
                raise ma.ValidationError("NUL characters are not allowed.", field_name=key)
        return data


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, Mapping):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_nul(v) for v in value)
    return False


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
