r"""Every request a test builds for SageMaker, CloudWatch or Application Auto Scaling, checked against the limits the
botocore service model documents and botocore's own validation leaves to the service: ``max`` (and ``min``) of a
string's or blob's length, a list's or map's entries and a number's value, ``pattern`` (the whole value must match,
as the service checks it) and ``enum``, through every structure, list and map.

A request that breaks one raises :class:`StrictRequestError` naming the operation, the field's path and the rule
(``SageMaker UpdateEndpoint: DeploymentConfig.BlueGreenUpdatePolicy.TrafficRoutingConfiguration.Type: 'NOT_A_TYPE'
is not one of ALL_AT_ONCE, CANARY, LINEAR (enum)``), before anything is sent. The check is installed on every
botocore client of those services the test process builds (:func:`install`, from tests/conftest.py), and the
autouse ``strict_request_check`` fixture there fails a test whose requests broke a rule even where the code under
test caught the error. Patterns are compiled with ``regex`` (in the lock through prefect's dateparser): botocore's
are Java's, with ``\p{L}``-style classes Python's ``re`` lacks.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import botocore.client
import regex
from botocore.model import OperationModel, Shape

CHECKED_SERVICES = frozenset({"sagemaker", "cloudwatch", "application-autoscaling"})
# Java's UTF-16 spelling of the supplementary planes (a surrogate pair range) in some "any XML character" patterns.
_JAVA_SURROGATES = r"\uD800\uDC00-\uDBFF\uDFFF"


class StrictRequestError(AssertionError):
    """A request breaks a rule of its service model (an AssertionError: code under test that handles the service's
    errors does not swallow it)."""


@functools.cache
def _pattern(java: str) -> Any:
    """A botocore (Java) pattern as a compiled ``regex`` (it knows ``\\p{L}`` and POSIX classes like ``\\p{Alnum}``)."""
    return regex.compile(java.replace(_JAVA_SURROGATES, r"\U00010000-\U0010FFFF"))


def _bounds(shape: Shape, value: Any, where: str) -> list[str]:
    """``min`` and ``max`` of a string's or blob's length, a list's or map's entries, a number's value."""
    if shape.type_name in ("string", "blob"):
        what, amount = "length", len(value)
    elif shape.type_name in ("list", "map"):
        what, amount = "entries", len(value)
    elif shape.type_name in ("integer", "long", "float", "double") and not isinstance(value, bool):
        what, amount = "value", value
    else:
        return []
    low, high = shape.metadata.get("min"), shape.metadata.get("max")
    return ([f"{where}: {what} {amount} is below {low} (min)"] if low is not None and amount < low else []) + (
        [f"{where}: {what} {amount} is above {high} (max)"] if high is not None and amount > high else []
    )


def _string_rules(shape: Shape, value: str, where: str) -> list[str]:
    found = []
    if shape.enum and value not in shape.enum:
        found.append(f"{where}: {value!r} is not one of {', '.join(shape.enum)} (enum)")
    pattern = shape.metadata.get("pattern")
    if pattern and _pattern(pattern).fullmatch(value) is None:
        found.append(f"{where}: {_shown(value)} does not match {pattern} (pattern)")
    return found


def problems(shape: Shape, value: Any, path: str = "") -> list[str]:
    """Each rule of ``shape`` (and its members) that ``value`` breaks, as ``<path>: <what> (<rule>)``."""
    if value is None:
        return []
    where = path or "(request)"
    found = _bounds(shape, value, where) if isinstance(value, (str, bytes, list, dict, int, float)) else []
    if shape.type_name == "string" and isinstance(value, str):
        found += _string_rules(shape, value, where)
    elif shape.type_name == "structure" and isinstance(value, dict):
        for name, member in value.items():
            if name in shape.members:
                found += problems(shape.members[name], member, f"{path}.{name}" if path else name)
    elif shape.type_name == "list" and isinstance(value, list):
        for index, item in enumerate(value):
            found += problems(shape.member, item, f"{path}[{index}]")
    elif shape.type_name == "map" and isinstance(value, dict):
        for key, item in value.items():
            found += problems(shape.key, key, f"{path} key {key!r}") + problems(shape.value, item, f"{path}[{key!r}]")
    return found


def _shown(value: str) -> str:
    return repr(value) if len(value) <= 80 else f"{value[:60]!r}... ({len(value)} characters)"


def check(operation: OperationModel, params: dict[str, Any]) -> None:
    """Raise :class:`StrictRequestError` listing every rule ``params`` break for ``operation``."""
    if operation.input_shape is None:
        return
    found = problems(operation.input_shape, params)
    if found:
        service = operation.service_model.service_id
        message = f"{service} {operation.name}: " + "; ".join(found)
        _broken.append(message)
        raise StrictRequestError(message)


_broken: list[str] = []  # every rule broken since the current test began (the fixture reads and clears it)


def _on_request(params: dict[str, Any], model: OperationModel, **_: Any) -> None:
    check(model, params)


def install() -> None:
    """Check every request of every client of :data:`CHECKED_SERVICES` built from now on (idempotent)."""
    create = botocore.client.ClientCreator.create_client
    if getattr(create, "strict_requests", False):
        return

    @functools.wraps(create)
    def create_client(self: Any, service_name: str, *args: Any, **kwargs: Any) -> Any:
        client = create(self, service_name, *args, **kwargs)
        if service_name in CHECKED_SERVICES:
            client.meta.events.register("before-parameter-build", _on_request, unique_id="strict-requests")
        return client

    create_client.strict_requests = True  # type: ignore[attr-defined]
    botocore.client.ClientCreator.create_client = create_client  # type: ignore[method-assign]


@contextmanager
def checking() -> Iterator[list[str]]:
    """The block's broken rules (a test that expects some clears the list); raises if any are left at its end."""
    install()
    _broken.clear()
    yield _broken
    if _broken:
        raise StrictRequestError("requests broke their service model's rules: " + " | ".join(_broken))
