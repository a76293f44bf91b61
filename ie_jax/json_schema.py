"""JSON Schema -> a regex of the JSON texts that satisfy it (ie_jax/guided.py turns the regex into the automaton
that holds generation to it). A subset of JSON Schema is enforced; a keyword outside it is refused by name, never
silently ignored, so a generated text always satisfies its schema. JSON comes out compact: at most one space
between tokens, object properties in the schema's order; those not `required` may be left out.
"""
from __future__ import annotations

import functools
import json

_WS = "[ ]?"  # at most one space between JSON tokens: compact output, and no endless runs of whitespace
_STRING_CHAR = r'([^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'
_INTEGER = r"-?(0|[1-9][0-9]{0,15})"
_NUMBER = _INTEGER + r"(\.[0-9]{1,15})?([eE][+-]?[0-9]{1,3})?"


def escape(text: str) -> str:
    """`text` as a regex that matches it literally."""
    return "".join("\\" + c if c in r".^$*+?{}[]\|()" else c for c in text)


def _json_literal(value) -> str:
    return escape(json.dumps(value, ensure_ascii=False))


def json_schema_regex(schema: dict, defs: dict | None = None, depth: int = 0) -> str:
    """A regex for JSON texts that satisfy `schema` (a subset of JSON Schema): type object (its properties in the
    schema's order, the ones not `required` optional), array (items, minItems/maxItems), string (enum,
    minLength/maxLength, pattern), integer, number, boolean, null; enum, const, anyOf/oneOf, local $ref. Others
    raise ValueError."""
    if depth > 16:
        raise ValueError("JSON Schema nests (or recurses through $ref) more than 16 levels")
    if schema is True or schema == {}:
        return json_value_regex(2)
    if not isinstance(schema, dict):
        raise ValueError(f"a JSON Schema must be an object, got {schema!r}")
    unknown = sorted(set(schema) - _SCHEMA_KEYWORDS)
    if unknown:  # a constraint the regex would not enforce: refused rather than broken
        raise ValueError(f"JSON Schema keywords {unknown} are not supported (supported: {sorted(_SCHEMA_KEYWORDS)})")
    defs = {**(defs or {}), **schema.get("$defs", {}), **schema.get("definitions", {})}
    sub = functools.partial(json_schema_regex, defs=defs, depth=depth + 1)
    if "$ref" in schema:
        ref = schema["$ref"]
        name = ref.rsplit("/", 1)[-1]
        if not ref.startswith(("#/$defs/", "#/definitions/")) or name not in defs:
            raise ValueError(f"$ref {ref!r}: only local references to $defs are supported")
        return sub(defs[name])
    if "const" in schema:
        return _json_literal(schema["const"])
    if "enum" in schema:
        return "(" + "|".join(_json_literal(v) for v in schema["enum"]) + ")"
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return "(" + "|".join(sub(s) for s in schema[key]) + ")"
    kind = schema.get("type")
    if isinstance(kind, list):
        return "(" + "|".join(sub({**schema, "type": k}) for k in kind) + ")"
    if kind == "object" or (kind is None and "properties" in schema):
        props, required = schema.get("properties", {}), set(schema.get("required", ()))
        if not props:
            return json_value_regex(2, only="object")
        if required - set(props):
            raise ValueError(f"required properties {sorted(required - set(props))} are not among the properties")
        if not schema.get("minProperties", 0) <= len(required) <= len(props) <= schema.get("maxProperties",
                                                                                            len(props)):
            raise ValueError("minProperties/maxProperties must fit every count of optional properties generated")
        members = [(f'"{escape(json.dumps(k)[1:-1])}"{_WS}:{_WS}{sub(v)}', k in required) for k, v in props.items()]
        return r"\{" + _WS + _members(members) + _WS + r"\}"
    if kind == "array":
        if not isinstance(schema.get("items", {}), (dict, bool)):
            raise ValueError("array items must be one schema (tuple validation is not supported)")
        item = sub(schema.get("items", {}))
        lo, hi = int(schema.get("minItems", 0)), schema.get("maxItems")
        if hi is not None and int(hi) == 0:
            return r"\[" + _WS + r"\]"
        more = f"({_WS},{_WS}{item})" + ("{%d,%s}" % (max(lo - 1, 0), "" if hi is None else int(hi) - 1))
        body = f"{item}{more}"
        return r"\[" + _WS + (body if lo > 0 else f"({body})?") + _WS + r"\]"
    if kind == "string":
        if "pattern" in schema:
            return '"(' + schema["pattern"].removeprefix("^").removesuffix("$") + ')"'
        lo, hi = int(schema.get("minLength", 0)), schema.get("maxLength")
        return f'"{_STRING_CHAR}' + "{%d,%s}" % (lo, "" if hi is None else int(hi)) + '"'
    if kind in ("integer", "number"):
        return _number_regex(kind, schema.get("minimum"), schema.get("exclusiveMinimum"))
    if kind == "boolean":
        return "(true|false)"
    if kind == "null":
        return "null"
    raise ValueError(f"JSON Schema {schema!r}: type {kind!r} is not supported")


def _members(members: list[tuple[str, bool]]) -> str:
    """The regex of an object's members in order, (member regex, required?) each: a comma before every member but
    the first one present. `rest` is the tail once a member has been written, `first` the tail before any; each
    optional member ahead of the first required one copies `rest` into `first` once more, so the regex grows with
    their count times the members. A 7-member object with no `required` (scripts/bench_guided.py's schema) builds
    its automaton in 1.2 s, against 0.3 s with all of them required (docs/benchmarks.md, v19)."""
    sep, rest, first = f"{_WS},{_WS}", "", ""
    for member, required in reversed(members):
        first = f"{member}{rest}" if required else f"({member}{rest}|{first})" if first else f"({member}{rest})?"
        rest = f"{sep}{member}{rest}" if required else f"({sep}{member})?{rest}"
    return first


# What json_schema_regex enforces, and the annotations it may ignore without breaking a constraint (additional
# properties are never generated; a format is an annotation unless a validator opts in).
_SCHEMA_KEYWORDS = frozenset({
    "$ref", "const", "enum", "anyOf", "oneOf", "type", "properties", "items", "minItems", "maxItems", "pattern",
    "minLength", "maxLength", "minimum", "exclusiveMinimum", "minProperties", "maxProperties",
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "$defs", "definitions",
    "deprecated", "readOnly", "writeOnly", "format", "required", "additionalProperties"})


def _number_regex(kind: str, minimum, exclusive_minimum) -> str:
    """Integers and numbers; the lower bounds a regex can hold are 0 and (integers) 1. Others raise."""
    lowest = None if minimum is None else minimum
    if exclusive_minimum is not None:
        if kind != "integer" or exclusive_minimum != 0:
            raise ValueError(f"exclusiveMinimum={exclusive_minimum} is not supported (an integer's 0 is)")
        lowest = 1
    if lowest is None:
        return _INTEGER if kind == "integer" else _NUMBER
    if lowest not in ((0, 1) if kind == "integer" else (0,)):
        raise ValueError(f"minimum={minimum} is not supported for {kind} values: only 0 (and for integers 1)")
    digits = "[1-9][0-9]{0,15}" if lowest == 1 else "(0|[1-9][0-9]{0,15})"
    return digits if kind == "integer" else digits + _NUMBER.removeprefix(_INTEGER)


def json_value_regex(depth: int, only: str | None = None) -> str:
    """Any JSON value nested at most `depth` objects/arrays deep (`only`: "object" for an object at the top)."""
    scalar = f'("{_STRING_CHAR}*"|{_NUMBER}|true|false|null)'
    value = scalar
    for _ in range(depth):
        member = f'"{_STRING_CHAR}*"{_WS}:{_WS}{value}'
        obj = r"\{" + _WS + f"({member}({_WS},{_WS}{member})*)?" + _WS + r"\}"
        arr = r"\[" + _WS + f"({value}({_WS},{_WS}{value})*)?" + _WS + r"\]"
        value = f"({scalar}|{obj}|{arr})"
        if only == "object" and _ == depth - 1:
            return obj
    return value
