"""Registry, schema, generated docs, the validate command, and the dsl's import boundary."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from dsl import docs
from dsl.document import MAX_ACTIONS
from dsl.schema import document_json_schema
from dsl.validate import main as validate_main
from dsl.validate import validate_file
from dsl.verbs import VERBS, Verb

DSL_DIR = Path(__file__).resolve().parents[2] / "dsl"

EXPECTED_NEEDS = {
    "say": "media",
    "play": "media",
    "getDigits": "media",
    "record": "media",
    "pause": "media",
    "aiAgent": "media",
    "dial": "media",
    "conference": "media",
    "stream": "media",
    "reject": "unanswered",
    "hangup": "any",
    "redirect": "any",
}


def test_registry_holds_every_verb_with_its_precondition() -> None:
    assert {name: cls.needs for name, cls in VERBS.items()} == EXPECTED_NEEDS
    for name, cls in VERBS.items():
        assert issubclass(cls, Verb) and cls.verb == name


def test_one_file_per_verb() -> None:
    files = {p.stem for p in (DSL_DIR / "verbs").glob("*.py")} - {"__init__", "base"}
    assert files == {"say", "play", "get_digits", "record", "dial", "conference", "redirect",
                     "reject", "hangup", "stream", "pause", "ai_agent"}  # fmt: skip


def test_schema_envelope() -> None:
    schema = document_json_schema()
    actions = schema["properties"]["actions"]
    assert actions["maxItems"] == MAX_ACTIONS
    assert schema["additionalProperties"] is False and schema["required"] == ["actions"]
    verbs = [next(iter(item["required"])) for item in actions["items"]["oneOf"]]
    assert verbs == list(VERBS)
    for item in actions["items"]["oneOf"]:
        ref = next(iter(item["properties"].values()))["$ref"]
        verb_schema = schema["$defs"][ref.rsplit("/", 1)[-1]]
        assert verb_schema["additionalProperties"] is False
        assert verb_schema["x-needs"] == EXPECTED_NEEDS[verb_schema["x-verb"]]
    json.dumps(schema)  # serialisable as is


def test_schema_shows_defaults_and_extensions() -> None:
    defs = document_json_schema()["$defs"]
    gd = defs["GetDigits"]["properties"]
    assert gd["finishOnKey"]["default"] == "#"
    assert gd["interDigitTimeout"]["x-extension"] is True
    assert "x-extension" not in gd["numDigits"]
    assert defs["Conference"]["properties"]["startOnEnter"]["default"] is True
    assert defs["Record"]["properties"]["playBeep"]["x-extension"] is True
    assert defs["Pause"]["x-extension"] is True
    assert defs["Dial"]["oneOf"] == [{"required": ["number"]}, {"required": ["numbers"]},
                                     {"required": ["sip"]}]  # fmt: skip


def test_markdown_documents_every_verb_and_parameter() -> None:
    text = docs.render_markdown()
    for name, cls in VERBS.items():
        assert f"## `{name}`" in text
        for field in cls.model_fields.values():
            assert f"| `{field.alias}` |" in text, (name, field.alias)
    assert "| `interDigitTimeout` | number | `null` | no | > 0, ≤ 3600 | extension |" in text
    assert '| `finishOnKey` | string | `"#"` | no |' in text
    assert "## `pause` (extension)" in text
    assert "`ErrDialTargetXOR`" in text and "`getDigits.nested`" in text


def test_docs_file_is_up_to_date() -> None:
    current = docs.DOC_PATH.read_text() if docs.DOC_PATH.exists() else ""
    assert current == docs.render_markdown(), (
        "docs/dsl.md is stale; regenerate it with: python -m dsl.docs"
    )


def test_docs_check_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(docs, "DOC_PATH", tmp_path / "docs" / "dsl.md")
    assert docs.main(["--check"]) == 1
    assert docs.main([]) == 0
    assert docs.main(["--check"]) == 0


def test_validate_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"actions": [{"say": {"text": "Hi"}}, {"hangup": {}}]}))
    assert validate_file(good) == (True, [])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"actions": [{"sayy": {}}, {"getDigits": {"finishOnkey": "#"}}]}))
    assert validate_file(bad) == (
        False,
        [
            "actions[0].sayy: unknown verb; did you mean say? [action.unknown_verb]",
            "actions[1].getDigits.finishOnkey: unknown parameter; did you mean finishOnKey?"
            " [param.unknown]",
        ],
    )
    ok, errors = validate_file(tmp_path / "missing.json")
    assert not ok and "cannot read" in errors[0]
    assert validate_main([str(good)]) == 0
    assert validate_main([str(bad)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "valid" and out[1].startswith("actions[0].sayy")


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted(DSL_DIR.rglob("*.py")), ids=lambda p: p.name)
def test_dsl_knows_nothing_of_sip_or_the_gateway(path: Path) -> None:
    forbidden = {"pjsua2", "aiohttp", "media", "gateway"}
    assert not _imported_modules(path) & forbidden
