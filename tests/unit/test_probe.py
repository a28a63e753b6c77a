"""The per-process call limit is probed from the installed pjsua2, not assumed."""

from __future__ import annotations

import json
from pathlib import Path

from config.settings import load_settings
from media.probe import probe_max_calls


def test_probe_counts_calls_pjsua2_accepts_and_caches_it(tmp_path: Path) -> None:
    cache = tmp_path / "probe.json"
    n = probe_max_calls(cache)
    # The PyPI build compiles PJSUA_MAX_CALLS as 4 (shared/design/pjsua2.md); any build >= 1.
    assert n >= 1
    saved = json.loads(cache.read_text())
    assert saved["max_calls"] == n
    saved["max_calls"] = 77  # a different build would have written this
    cache.write_text(json.dumps(saved))
    assert probe_max_calls(cache) == 77, "same build: the cached figure is used"
    saved["build"] = "another build"
    cache.write_text(json.dumps(saved))
    assert probe_max_calls(cache) == n, "another build: probed again"


def test_worker_plan_follows_the_probed_limit(tmp_path: Path) -> None:
    s = load_settings(None, environ={})
    assert s.worker_plan(4) == (8, 4)  # 32 calls, every slot taking calls
    assert s.worker_plan(32) == (1, 32)  # a build with a larger PJSUA_MAX_CALLS: fewer workers
    s2 = load_settings(None, environ={"SAUTIKIT_WORKERS__COUNT": "3",
                                      "SAUTIKIT_WORKERS__RESERVED_SLOTS": "1"})
    assert s2.worker_plan(4) == (3, 3) and s2.front_mode() == "managed"
