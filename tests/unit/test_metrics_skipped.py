"""sautikit_actions_skipped_total: a say/play skipped for its media is counted, by verb/reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dsl.interpreter import Interpreter
from gateway.metrics import ACTION_SKIPPED, NodeMetrics
from gateway.workers.protocol import Metric
from tests.unit.test_dsl_fakes import Fake, doc, say
from tests.unit.test_metrics import parse


def action_skipped_msg(verb: str, reason: str) -> dict[str, Any]:
    return Metric(name=ACTION_SKIPPED, verb=verb, reason=reason).model_dump(exclude_none=True)


def metrics() -> NodeMetrics:
    return NodeMetrics(calls=lambda: [], workers=lambda: [], outbox_counts=lambda: None)


def test_skipped_actions_render_by_verb_and_reason() -> None:
    m = metrics()
    assert m.observe(action_skipped_msg("play", "media_fetch_failed"))
    assert m.observe(action_skipped_msg("play", "media_fetch_failed"))
    assert m.observe(action_skipped_msg("say", "tts_failed"))
    assert m.observe(action_skipped_msg("dial", "tts_failed"))  # bounded labels
    assert m.observe(action_skipped_msg("play", "made-up"))  # dropped, logged
    text = m.render()
    fam = parse(text)["sautikit_actions_skipped_total"]
    assert fam.type == "counter"
    assert fam.get(verb="play", reason="media_fetch_failed") == 2
    assert fam.get(verb="say", reason="tts_failed") == 1
    assert fam.get(verb="other", reason="tts_failed") == 1
    assert len(fam.samples) == 3 and "made-up" not in text


async def test_interpreter_reports_each_skip_with_the_call_id(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    fake = Fake(tmp_path)
    skips: list[tuple[str, str]] = []
    fake.ctx.on_skip = lambda verb, reason: skips.append((verb, reason))
    fake.prompts.failing.add("https://media.example/missing.wav")
    await Interpreter(fake.ctx).run(
        doc({"play": {"url": "https://media.example/missing.wav"}}, say("fine"))
    )
    assert skips == [("play", "media_fetch_failed")]
    assert any("call call-1: actions[0].play: media_fetch_failed" in r.getMessage()
               for r in caplog.records)
