"""The Voice Actions document: `{"actions": [{"<verb>": {params}}, ...]}`, validated whole.

Every problem is reported at once, each with its JSON path, a stable code and, for a
misspelt name, the nearest valid one. Nothing of a document runs unless all of it is valid.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from dsl.errors import DocIssue, DocumentError, did_you_mean
from dsl.verbs import VERBS, Verb
from dsl.verbs.base import DTMF_KEY_PATTERN, DTMF_KEYS_PATTERN
from dsl.verbs.conference import STATUS_EVENTS_PATTERN
from dsl.verbs.dial import E164_PATTERN, SIP_URI_PATTERN
from dsl.verbs.say import LANGUAGE_PATTERN

MAX_ACTIONS = 50  # the SDK's limit
MAX_BYTES = 64 * 1024
MAX_DEPTH = 32  # arrays/objects inside one another; real documents nest 4-5 deep
ENVELOPE_KEYS = ("actions",)

# Pydantic's own rule codes become these; the product's rule names pass through as codes.
PRODUCT_CODES = frozenset({"ErrDialTargetXOR", "ErrDialNumberNumbers", "aiAgent.handover"})
_PATTERN_HINTS = {
    DTMF_KEY_PATTERN: 'expected one key: 0-9, * or #, or "" for none',
    DTMF_KEYS_PATTERN: "expected keys from 0-9, * and #",
    E164_PATTERN: "expected an E.164 number like +254711000000",
    SIP_URI_PATTERN: "expected a SIP URI like sip:alice@example.com, or client:<name>",
    LANGUAGE_PATTERN: "expected a BCP-47 language tag like en-KE",
    STATUS_EVENTS_PATTERN: 'expected a space-separated subset of "start end join leave"',
}
_TYPE_MESSAGES = {
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "string_type": "expected a string",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "list_type": "expected a list",
    "dict_type": "expected an object",
    "model_type": "expected an object",
    "model_attributes_type": "expected an object",
}


@dataclass(frozen=True)
class Document:
    """A valid document: its verbs, top to bottom."""

    actions: tuple[Verb, ...]


def parse_document(raw: bytes | str | Any) -> Document:
    """Validate a whole document (raw JSON bytes/str, or already-parsed JSON).

    Raises `DocumentError` listing every problem found.
    """
    body = _load(raw)
    if not isinstance(body, dict):
        raise DocumentError(
            [
                DocIssue(
                    "", "document.not_object", f'expected {{"actions": [...]}}, got {_kind(body)}'
                )
            ]
        )
    issues: list[DocIssue] = []
    for key in body:
        if key not in ENVELOPE_KEYS:
            message = did_you_mean("unknown parameter", key, ENVELOPE_KEYS)
            issues.append(DocIssue(str(key), "param.unknown", message))
    if "actions" not in body:
        issues.append(DocIssue("actions", "param.required", "required: the list of actions"))
        raise DocumentError(issues)
    actions = body["actions"]
    if not isinstance(actions, list):
        issues.append(DocIssue("actions", "param.invalid", "expected a list"))
        raise DocumentError(issues)
    if len(actions) > MAX_ACTIONS:
        message = f"{len(actions)} actions; at most {MAX_ACTIONS} are allowed"
        raise DocumentError([*issues, DocIssue("actions", "document.too_many_actions", message)])
    verbs = [_parse_action(item, f"actions[{i}]", issues) for i, item in enumerate(actions)]
    for i, verb in enumerate(verbs[:-1]):
        if verb is not None and verb.must_be_last:
            message = f"{verb.verb} must be the last action"
            issues.append(DocIssue(f"actions[{i}].{verb.verb}", f"{verb.verb}.not_last", message))
    if issues:
        raise DocumentError(issues)
    return Document(tuple(v for v in verbs if v is not None))


def check_depth(data: bytes) -> None:
    """Refuse JSON text nested deeper than MAX_DEPTH, scanned without recursion (json.loads
    recurses, so a 60 000-deep document must be stopped before it is parsed)."""
    if data.count(b"[") + data.count(b"{") <= MAX_DEPTH:
        return  # nesting needs an opener per level: too few to be too deep (no byte loop)
    depth, in_string, escaped = 0, False, False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > MAX_DEPTH:
                message = f"nested deeper than {MAX_DEPTH} levels; at most {MAX_DEPTH} are allowed"
                raise DocumentError([DocIssue("", "document.too_deep", message)])
        elif byte in (0x5D, 0x7D):
            depth -= 1


def _load(raw: Any) -> Any:
    if isinstance(raw, bytes | bytearray | memoryview | str):
        data = raw.encode() if isinstance(raw, str) else bytes(raw)
        if len(data) > MAX_BYTES:
            raise _too_large(len(data))
        check_depth(data)
        try:
            return json.loads(data)
        except UnicodeDecodeError:
            raise DocumentError([DocIssue("", "document.not_json", "not UTF-8 text")]) from None
        except json.JSONDecodeError as err:
            message = f"not valid JSON: {err.msg} at line {err.lineno} column {err.colno}"
            raise DocumentError([DocIssue("", "document.not_json", message)]) from None
        except RecursionError:
            raise DocumentError([DocIssue("", "document.not_json", "nested too deeply")]) from None
    # Already parsed (the voice app client's reply): the limit still holds on its compact form.
    try:
        size = len(json.dumps(raw, separators=(",", ":"), ensure_ascii=False).encode())
    except (TypeError, ValueError, RecursionError):
        return raw  # not JSON-shaped; validation says what is wrong with it
    if size > MAX_BYTES:
        raise _too_large(size)
    return raw


def _too_large(size: int) -> DocumentError:
    message = f"document is {size} bytes; at most {MAX_BYTES} are allowed"
    return DocumentError([DocIssue("", "document.too_large", message)])


def _parse_action(
    item: Any,
    path: str,
    issues: list[DocIssue],
    allowed: Collection[str] | None = None,
    parent: str | None = None,
) -> Verb | None:
    """One `{"<verb>": {params}}` item; `allowed` narrows the verbs (nested prompts)."""
    if not isinstance(item, dict):
        message = (
            f'expected an object with exactly one verb, e.g. {{"say": {{...}}}}; got {_kind(item)}'
        )
        issues.append(DocIssue(path, "action.one_verb", message))
        return None
    if len(item) != 1:
        found = f"{len(item)} verbs ({', '.join(map(str, item))})" if item else "no verb"
        message = f"{found} in one item; expected exactly one"
        issues.append(DocIssue(path, "action.one_verb", message))
        return None
    ((name, params),) = item.items()
    vpath = f"{path}.{name}"
    candidates = VERBS if allowed is None else allowed
    cls = VERBS.get(name)
    if cls is None:
        message = did_you_mean("unknown verb", name, candidates)
        issues.append(DocIssue(vpath, "action.unknown_verb", message))
        return None
    if name not in candidates:
        message = f"only {' or '.join(candidates)} may be nested in {parent}"
        issues.append(DocIssue(vpath, f"{parent}.nested", message))
        return None
    if not isinstance(params, dict):
        message = f"expected an object of parameters (e.g. {{}}), got {_kind(params)}"
        issues.append(DocIssue(vpath, "param.invalid", message))
        return None
    return _validate(cls, params, vpath, issues)


def _validate(
    cls: type[Verb], params: dict[str, Any], vpath: str, issues: list[DocIssue]
) -> Verb | None:
    nested_issues: list[DocIssue] = []
    nested = params.get("nested")
    if cls.nested_verbs and isinstance(nested, list):
        # Checked as actions so errors read like the rest (paths, suggestions, codes).
        for i, sub in enumerate(nested):
            sub_path = f"{vpath}.nested[{i}]"
            _parse_action(sub, sub_path, nested_issues, allowed=cls.nested_verbs, parent=cls.verb)
        if nested_issues:
            params = {k: v for k, v in params.items() if k != "nested"}
    verb: Verb | None = None
    try:
        verb = cls.model_validate(params)
    except ValidationError as err:
        issues.extend(_from_pydantic(err, cls, vpath))
    issues.extend(nested_issues)
    return None if nested_issues else verb


def _from_pydantic(err: ValidationError, cls: type[Verb], vpath: str) -> list[DocIssue]:
    names = [f.alias or n for n, f in cls.model_fields.items()]
    merged: dict[str, DocIssue] = {}  # a union's alternatives share a path: one issue each
    out: list[DocIssue] = []
    for e in err.errors(include_url=False):
        loc = e["loc"]
        path = vpath
        if loc:
            # Ints are list indexes; other strings after the field are union member tags.
            path += f".{loc[0]}" + "".join(f"[{x}]" for x in loc[1:] if isinstance(x, int))
        kind = e["type"]
        if kind == "extra_forbidden":
            out.append(
                DocIssue(
                    path, "param.unknown", did_you_mean("unknown parameter", str(loc[-1]), names)
                )
            )
        elif kind == "missing":
            out.append(DocIssue(path, "param.required", "required parameter missing"))
        elif kind in PRODUCT_CODES:
            out.append(DocIssue(path, kind, e["msg"]))
        elif path in merged:
            first = merged[path]
            extra = _message(e).removeprefix("expected ")
            issue = DocIssue(path, first.code, f"{first.message} or {extra}")
            out[out.index(first)] = merged[path] = issue
        else:
            merged[path] = DocIssue(path, "param.invalid", _message(e))
            out.append(merged[path])
    return out


def _message(e: ErrorDetails) -> str:
    kind, ctx = e["type"], e.get("ctx", {})
    if kind in _TYPE_MESSAGES:
        return _TYPE_MESSAGES[kind]
    if kind == "literal_error":
        return "expected " + str(ctx.get("expected", "")).replace("'", '"')
    if kind in ("dial_number", "param_message"):  # ours, written for the reader: as is
        return str(e["msg"])
    if kind == "string_pattern_mismatch":
        return _PATTERN_HINTS.get(str(ctx.get("pattern")), "invalid format")
    if kind == "string_too_short":
        n = ctx.get("min_length", 1)
        return "must not be empty" if n == 1 else f"must be at least {n} characters"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} items"
    if kind == "too_long":
        return f"must have at most {ctx.get('max_length')} items"
    bounds = {
        "greater_than": "must be greater than {gt}",
        "greater_than_equal": "must be at least {ge}",
        "less_than": "must be less than {lt}",
        "less_than_equal": "must be at most {le}",
    }
    if kind in bounds:  # 384000.0 (a float field's bound) reads as 384000
        return bounds[kind].format(**{k: _number(v) for k, v in ctx.items()})
    return str(e["msg"]).lower()


def _number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
