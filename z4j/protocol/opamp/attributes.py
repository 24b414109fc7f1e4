"""Attributes (OTLP ``KeyValue`` lists) to plain Python values and back.

Agents describe themselves with resource attributes (``service.name``,
``host.name``, ...). Selectors, the fleet API and tests want them as a dict;
building a description wants the reverse. An unset ``AnyValue`` is None.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeAlias

from . import opamp_pb2 as pb

__all__ = ["AttributeValue", "from_python", "key_values", "to_dict", "to_python"]

AttributeValue: TypeAlias = (
    str | bool | int | float | bytes | list["AttributeValue"] | dict[str, "AttributeValue"] | None
)


def to_python(value: pb.AnyValue) -> AttributeValue:
    """The Python value an ``AnyValue`` holds."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [to_python(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return to_dict(value.kvlist_value.values)
    scalar: AttributeValue = getattr(value, kind)
    return scalar


def to_dict(pairs: Iterable[pb.KeyValue]) -> dict[str, AttributeValue]:
    """Attributes as a dict; a repeated key keeps its last value."""
    return {pair.key: to_python(pair.value) for pair in pairs}


def from_python(value: AttributeValue) -> pb.AnyValue:
    """An ``AnyValue`` holding ``value`` (bool before int: ``True`` is an int too)."""
    if value is None:
        return pb.AnyValue()
    if isinstance(value, bool):
        return pb.AnyValue(bool_value=value)
    if isinstance(value, int):
        return pb.AnyValue(int_value=value)
    if isinstance(value, float):
        return pb.AnyValue(double_value=value)
    if isinstance(value, str):
        return pb.AnyValue(string_value=value)
    if isinstance(value, bytes):
        return pb.AnyValue(bytes_value=value)
    if isinstance(value, list):
        return pb.AnyValue(array_value=pb.ArrayValue(values=[from_python(v) for v in value]))
    return pb.AnyValue(kvlist_value=pb.KeyValueList(values=key_values(value)))


def key_values(attributes: Mapping[str, AttributeValue]) -> list[pb.KeyValue]:
    """A ``KeyValue`` list from a dict, in its order."""
    return [pb.KeyValue(key=key, value=from_python(value)) for key, value in attributes.items()]
