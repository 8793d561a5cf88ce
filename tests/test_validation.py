"""JSON Schema validation before dispatch: one invalid input per command of the Python adapter,
each refused with a ValidationError naming the field and the rule, and nothing sent."""

from __future__ import annotations

import math

import pytest

from snakepit_core import Pool
from snakepit_core.errors import UnknownCommand, ValidationError
from snakepit_core.plugins import get_plugin_manager
from snakepit_core.schemas import envelope_schema, shared_command_schemas
from snakepit_core.validation import StrictValidator, compile_schema

INVALID = [
    ("ping", {"worker_id": 5}, "args.worker_id", "type"),
    ("echo", {"session_id": 12}, "args.session_id", "type"),
    ("compute", {"operation": "modulo", "a": 1, "b": 2}, "args.operation", "enum"),
    ("compute", {"operation": "add", "a": "1", "b": 2}, "args.a", "type"),
    ("compute", {"operation": "add", "a": 1}, "args.b", "required"),
    ("compute", {"operation": "add", "a": 1, "b": 2, "c": 3}, "args.c", "additionalProperties"),
    ("compute", {"operation": "add", "a": math.nan, "b": 2}, "args.a", "type"),
    ("compute", {"operation": "add", "a": math.inf, "b": 2}, "args.a", "type"),
    ("info", {"verbose": True}, "args.verbose", "additionalProperties"),
    ("sleep", {"seconds": -1}, "args.seconds", "minimum"),
    ("store", {"value": 1}, "args.key", "required"),
    ("retrieve", {"key": 5}, "args.key", "type"),
    ("clear_session", {"everything": True}, "args.everything", "additionalProperties"),
    ("create_program", {"signature": "no arrow here"}, "args.signature", "pattern"),
    ("execute_program", {"program": {"signature": "a -> b"}}, "args.inputs", "required"),
    ("stream", {"count": -1}, "args.count", "minimum"),
    ("call_host", {"name": "x", "times": 0}, "args.times", "minimum"),
    ("call_host", {"args": {}}, "args.name", "required"),
]


@pytest.fixture(scope="module")
def hooks():
    adapter = get_plugin_manager().get_adapter("python")
    return get_plugin_manager().hooks_for(adapter)


@pytest.mark.parametrize(
    ("command", "args", "field", "rule"), INVALID, ids=[f"{c}-{r}-{f}" for c, _, f, r in INVALID]
)
def test_invalid_arguments_name_the_field_and_rule(hooks, command, args, field, rule):
    with pytest.raises(ValidationError) as info:
        hooks.validate_command(command, args)
    error = info.value
    assert error.code == "validation_error"
    assert error.field == field and error.rule == rule
    assert field in str(error) and rule in str(error) and "'python'" in str(error)


def test_every_python_command_has_an_invalid_input_case(hooks):
    assert {command for command, *_ in INVALID} == set(hooks.adapter.commands)


def test_valid_arguments_pass(hooks):
    hooks.validate_command("compute", {"operation": "divide", "a": 7, "b": 2.5})
    hooks.validate_command("echo", {"anything": [1, {"nested": True}]})
    hooks.validate_command("create_program", {"signature": "q -> a", "model": "m"})


def test_unknown_command_lists_the_supported_ones(hooks):
    with pytest.raises(UnknownCommand) as info:
        hooks.validate_command("explode", {})
    assert info.value.code == "unknown_command"
    assert "compute" in str(info.value) and "explode" in str(info.value)


async def test_invalid_arguments_never_reach_a_worker():
    async with Pool("python", pool_size=1) as pool:
        for command, args, _field, _rule in INVALID:
            with pytest.raises(ValidationError):
                await pool.execute(command, args)
        worker = next(iter(pool.workers.values()))
        assert worker.requests == 1  # the handshake only
        stats = pool.stats()  # counted as failed requests
        assert stats["requests"] == stats["errors"] == len(INVALID)


def test_compiled_validators_are_cached(hooks):
    from snakepit_core.validation import SchemaValidation

    core = get_plugin_manager()._pm.get_plugin("snakepit.core")
    assert isinstance(core, SchemaValidation)
    first, _ = core._validator(hooks.adapter, "compute")
    assert core._validator(hooks.adapter, "compute")[0] is first


def test_schemas_are_draft_2020_12_and_strict():
    for name, schema in shared_command_schemas().items():
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema", name
        StrictValidator.check_schema(schema)
        if name not in ("echo", "create_program", "ping"):  # these take extra arguments
            assert schema["additionalProperties"] is False, name


def test_envelope_schemas_describe_the_wire():
    request = compile_schema(envelope_schema("request"))
    response = compile_schema(envelope_schema("response"))
    assert request.is_valid({"id": 1, "command": "ping", "args": {}})
    assert request.is_valid(
        {
            "id": 1,
            "command": "ping",
            "args": {},
            "meta": {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
        }
    )
    assert not request.is_valid({"command": "ping"})
    assert response.is_valid({"id": 1, "success": True, "result": None})
    assert response.is_valid({"id": 1, "success": False, "error": "boom"})
    assert not response.is_valid({"id": 1, "success": True})
    assert not response.is_valid({"id": 1, "success": False})
