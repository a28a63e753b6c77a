"""`sautikit-gateway`: run the node, place a demo call, manage dead letters, validate documents."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from config.settings import ConfigError, Settings, load_settings


def _settings(path: Path | None) -> Settings:
    try:
        return load_settings(path)
    except ConfigError as e:
        print(f"sautikit-gateway: invalid configuration: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    except FileNotFoundError as e:
        print(f"sautikit-gateway: config file not found: {e.filename}", file=sys.stderr)
        raise SystemExit(2) from e


def cmd_run(args: argparse.Namespace) -> int:
    from gateway.forkserver import ForkServer
    from gateway.logs import setup_logging

    settings = _settings(args.config)
    forkserver = None
    if settings.workers.start == "fork":  # its imports overlap the supervisor's
        forkserver = ForkServer(args.config)
        forkserver.launch()
    from gateway.node import run_node

    setup_logging(settings.log.level, settings.log.json_format, "supervisor")
    try:
        asyncio.run(run_node(settings, args.config, forkserver=forkserver))
    except ConfigError as e:  # found while planning workers (e.g. ports for the probed count)
        print(f"sautikit-gateway: invalid configuration: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return asyncio.run(run_demo(verbose=args.verbose))


def cmd_events(args: argparse.Namespace) -> int:
    from gateway.events.admin import format_dead_letters, retry_dead_letter
    from gateway.events.outbox import Outbox

    settings = _settings(args.config)
    outbox = Outbox(settings.storage.dir / "outbox.sqlite3")
    try:
        if args.retry:
            try:
                print(retry_dead_letter(outbox, args.retry))
            except KeyError:
                print(f"no dead letter {args.retry!r}", file=sys.stderr)
                return 1
            return 0
        if args.dead:
            print(format_dead_letters(outbox) or "no dead letters")
            return 0
        print(json.dumps(outbox.counts()))
        return 0
    finally:
        outbox.close()


def cmd_validate(args: argparse.Namespace) -> int:
    from dsl.validate import validate_file

    ok, errors = validate_file(args.file)
    if ok:
        print("valid")
        return 0
    for line in errors:
        print(line)
    return 1


def cmd_schema(args: argparse.Namespace) -> int:
    from dsl.schema import document_json_schema

    print(json.dumps(document_json_schema(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="sautikit-gateway", description="Sautikit voice gateway (SIP + Voice Actions)"
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run the gateway node (supervisor + SIP workers)")
    run.add_argument("--config", type=Path, help="TOML config (default: the embedded demo one)")
    run.set_defaults(fn=cmd_run)
    demo = sub.add_parser("demo", help="start a gateway, call it over loopback, show what happened")
    demo.add_argument("-v", "--verbose", action="store_true")
    demo.set_defaults(fn=cmd_demo)
    ev = sub.add_parser("events", help="event outbox: counts, dead letters, re-send")
    ev.add_argument("--config", type=Path)
    ev.add_argument("--dead", action="store_true", help="list dead letters")
    ev.add_argument("--retry", metavar="ID", help="re-send a dead letter (row id or event_id)")
    ev.set_defaults(fn=cmd_events)
    val = sub.add_parser("validate", help="validate a Voice Actions document")
    val.add_argument("file", type=Path)
    val.set_defaults(fn=cmd_validate)
    sch = sub.add_parser("schema", help="print the Voice Actions JSON Schema")
    sch.set_defaults(fn=cmd_schema)
    args = p.parse_args(argv)
    raise SystemExit(args.fn(args))


if __name__ == "__main__":
    main()
