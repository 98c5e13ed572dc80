"""The hot endpoints' requests and replies without marshmallow's per-call machinery.

The schemas stay the single definition of bodies, replies and the OpenAPI document:
:func:`arguments` is ``blp.arguments`` that skips parsing the common body (every field absent
or at its default, whose result is known), and :func:`dumper` compiles an output schema once
into a plain function that gives what ``schema.dump`` gives. Only the field types replies use
are supported; any other is refused when the dumper is built, never serialised differently.
:class:`Blueprint` makes each argument schema once, not once per request.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

import flask_smorest
import marshmallow as ma
from flask import Response, current_app, request

F = TypeVar("F", bound=Callable[..., Any])

Dump = Callable[[Any], Any]


class Blueprint(flask_smorest.Blueprint):
    """flask-smorest's Blueprint, except that ``arguments`` given a schema class makes its
    instance once: webargs would make one for every request (about 60 us for a ten-field
    schema, more than loading the body). Loading keeps no state in the schema, so one
    instance serves every request and thread; the OpenAPI document is the same."""

    def arguments(self, schema: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(schema, type):
            schema = schema()
        return super().arguments(schema, *args, **kwargs)


def _nullable(convert: Dump) -> Dump:
    return lambda value: None if value is None else convert(value)


def _iso(value: dt.datetime) -> str:
    return value.isoformat()


def _field(field: ma.fields.Field) -> Dump:
    """The serialiser of one field (marshmallow's ``_serialize`` for these types)."""
    if isinstance(field, ma.fields.Nested):
        inner = dumper(field.schema)
        return _nullable((lambda items: [inner(x) for x in items]) if field.many else inner)
    if isinstance(field, ma.fields.List):
        item = _field(field.inner)
        return _nullable(lambda items: [item(x) for x in items])
    if isinstance(field, ma.fields.DateTime) and field.format in (None, "iso"):
        return _nullable(_iso)
    if isinstance(field, ma.fields.Dict) and field.key_field is None and field.value_field is None:
        return _nullable(dict)
    simple: dict[type, Dump] = {
        ma.fields.String: str,
        ma.fields.Integer: int,
        ma.fields.Float: float,
        ma.fields.Boolean: bool,
    }
    for kind, convert in simple.items():
        if type(field) is kind and not getattr(field, "as_string", False):
            return _nullable(convert)
    raise TypeError(f"dumper: unsupported field {field!r}")


def dumper(schema: ma.Schema | type[ma.Schema]) -> Callable[..., dict[str, Any]]:
    """A function ``obj → dict`` equal to ``schema.dump(obj)`` (attributes read with getattr;
    an object lacking one is an error, where marshmallow would leave the key out). Extra
    keyword arguments are attributes read before the object's: ``dump(task, warnings=[])``
    is ``schema.dump(Extended(task, warnings=[]))``, without a ``__getattr__`` per field."""
    instance = schema() if isinstance(schema, type) else schema
    plan = [
        (field.data_key or name, field.attribute or name, _field(field))
        for name, field in instance.dump_fields.items()
    ]

    def dump(obj: Any, **extra: Any) -> dict[str, Any]:
        if isinstance(obj, dict):
            return {key: convert(obj[attr]) for key, attr, convert in plan}
        if extra:
            return {
                key: convert(extra[attr] if attr in extra else getattr(obj, attr))
                for key, attr, convert in plan
            }
        return {key: convert(getattr(obj, attr)) for key, attr, convert in plan}

    return dump


def reply(data: Any, status: int = 200) -> Response:
    """A JSON response, as flask-smorest would have sent ``data`` once dumped."""
    response = current_app.json.response(data)
    response.status_code = status
    return cast(Response, response)


def at_defaults(schema: type[ma.Schema]) -> Callable[[], bool]:
    """Whether the request's JSON body has every field of ``schema`` absent or equal, value
    and type, to what loading ``{}`` gives (so loading it would give that, and cannot fail)."""
    defaults = schema().load({})
    return lambda: request.is_json and _at_defaults(request.get_json(silent=True), defaults)


def arguments(blp: Blueprint, schema: type[ma.Schema]) -> Callable[[F], F]:
    """``blp.arguments(schema)`` (JSON body), except that a body :func:`at_defaults` is not
    parsed: the view gets what loading it would give."""
    defaults = schema().load({})
    common = at_defaults(schema)

    def decorate(func: F) -> F:
        parsed = blp.arguments(schema)(func)
        view = parsed.__wrapped__  # flask-smorest's wrapper, below webargs' parsing

        @functools.wraps(parsed)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if common():
                return view(*args, _fresh(defaults), **kwargs)
            return parsed(*args, **kwargs)

        return cast(F, wrapper)

    return decorate


def _at_defaults(body: Any, defaults: dict[str, Any]) -> bool:
    return isinstance(body, dict) and all(
        key in defaults and type(value) is type(defaults[key]) and value == defaults[key]
        for key, value in body.items()
    )


def _fresh(defaults: dict[str, Any]) -> dict[str, Any]:
    """A copy the view may change (the defaults are scalars or empty containers)."""
    return {
        key: value.copy() if isinstance(value, list | dict) else value
        for key, value in defaults.items()
    }
