"""The core's own ``snakepit_validate_command``: declared commands and JSON Schemas.

Compiled validators are cached per adapter and command, so the hot path pays only for the
check itself. JSON numbers exclude NaN and Infinity (they are not JSON), so a schema's
``"type": "number"`` refuses them with a clear message.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import jsonschema
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from .adapter import Adapter
from .errors import UnknownCommand, ValidationError
from .hookspecs import hookimpl
from .json_values import format_path
from .protocol import is_finite_number

_type_checker = Draft202012Validator.TYPE_CHECKER.redefine(
    "number", lambda _checker, value: is_finite_number(value)
)
StrictValidator = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
    Draft202012Validator, type_checker=_type_checker
)


def compile_schema(schema: Mapping[str, Any]) -> Any:
    """Check ``schema`` itself and return a validator for it."""
    StrictValidator.check_schema(schema)
    return StrictValidator(schema)


def describe_error(command: str, error: jsonschema.ValidationError) -> tuple[str, str, str]:
    """``(field, rule, message)`` for the error, naming the exact field at fault."""
    field = format_path(tuple(error.absolute_path))
    rule = str(error.validator)
    instance = error.instance
    if rule == "required" and isinstance(instance, dict):
        required: Any = error.validator_value
        missing = [name for name in required if name not in instance]
        field = f"{field}.{missing[0]}" if missing else field
        return field, rule, f"{command}: {field} is required (rule: required)"
    if rule == "additionalProperties" and isinstance(instance, dict):
        schema: Any = error.schema
        known = set(schema.get("properties", {}))
        extra = sorted(name for name in instance if name not in known)
        field = f"{field}.{extra[0]}" if extra else field
        return (
            field,
            rule,
            (
                f"{command}: {field} is not allowed (rule: additionalProperties; "
                f"allowed: {', '.join(sorted(known)) or 'none'})"
            ),
        )
    if rule == "type" and error.validator_value == "number" and isinstance(instance, float):
        return (
            field,
            rule,
            f"{command}: {field} must be a finite number, got {instance!r} (rule: type)",
        )
    return field, rule, f"{command}: {field}: {error.message} (rule: {rule})"


_Compiled = tuple[Any, bool]


class SchemaValidation:
    """Registered as the plugin ``snakepit.core``; runs for every adapter."""

    def __init__(self) -> None:
        self._validators: weakref.WeakKeyDictionary[Adapter, dict[str, _Compiled]] = (
            weakref.WeakKeyDictionary()
        )

    def _validator(self, adapter: Adapter, command: str) -> _Compiled:
        """The cached ``(validator, accepts_empty)`` of ``command`` (validator None: no schema).

        A schema that accepts ``{}`` is remembered as such, so the many calls with empty
        arguments (ping, info) skip the schema walk entirely.
        """
        per_adapter = self._validators.get(adapter)
        if per_adapter is None:
            per_adapter = self._validators[adapter] = {}
        try:
            return per_adapter[command]
        except KeyError:
            schema = adapter.schemas.get(command)
            validator = None if schema is None else compile_schema(schema)
            compiled = (validator, validator is None or bool(validator.is_valid({})))
            per_adapter[command] = compiled
            return compiled

    @hookimpl
    def snakepit_validate_command(
        self, adapter: Adapter, command: str, args: dict[str, Any]
    ) -> None:
        if adapter.commands is not None and command not in adapter.commands:
            supported = ", ".join(sorted(adapter.commands))
            raise UnknownCommand(
                f"adapter {adapter.name!r} has no command {command!r} (supported: {supported})",
                adapter=adapter.name,
                command=command,
            )
        validator, accepts_empty = self._validator(adapter, command)
        if validator is None or (accepts_empty and not args):
            return
        error = best_match(validator.iter_errors(args))
        if error is not None:
            field, rule, message = describe_error(command, error)
            raise ValidationError(
                f"adapter {adapter.name!r}: {message}",
                adapter=adapter.name,
                command=command,
                field=field,
                rule=rule,
            )
