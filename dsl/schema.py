"""The JSON Schema of a Voice Actions document, generated from the verb models."""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from dsl.document import MAX_ACTIONS
from dsl.verbs import VERBS

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def verb_defs() -> dict[str, Any]:
    """Every verb model's schema (and the models they use), keyed by class name."""
    _, top = models_json_schema(
        [(cls, "validation") for cls in VERBS.values()], ref_template="#/$defs/{model}"
    )
    defs: dict[str, Any] = top["$defs"]
    # ErrDialTargetXOR as schema: exactly one target present.
    defs["Dial"]["oneOf"] = [{"required": [k]} for k in ("number", "numbers", "sip")]
    return defs


def document_json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of `{"actions": [...]}`.

    Verb schemas carry `x-verb`, `x-needs` (the precondition) and `x-extension` on parameters
    (and verbs) the SDK does not write.
    """
    items = [
        {
            "type": "object",
            "properties": {name: {"$ref": f"#/$defs/{cls.__name__}"}},
            "required": [name],
            "additionalProperties": False,
        }
        for name, cls in VERBS.items()
    ]
    return {
        "$schema": SCHEMA_DIALECT,
        "title": "Sautikit Voice Actions document",
        "type": "object",
        "properties": {
            "actions": {
                "type": "array",
                "maxItems": MAX_ACTIONS,
                "items": {"oneOf": items},
                "description": "Run top to bottom; exactly one verb per item.",
            }
        },
        "required": ["actions"],
        "additionalProperties": False,
        "$defs": verb_defs(),
    }
