"""`sautikit-gateway validate FILE`: is this Voice Actions document valid, and if not, why."""

from __future__ import annotations

import sys
from pathlib import Path

from dsl.document import parse_document
from dsl.errors import DocumentError


def validate_file(path: str | Path) -> tuple[bool, list[str]]:
    """(True, []) when valid; else (False, every problem as "path: message [code]")."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as err:
        return False, [f"{p}: cannot read: {err.strerror or err}"]
    try:
        parse_document(data)
    except DocumentError as err:
        return False, [f"{issue} [{issue.code}]" for issue in err.errors]
    return True, []


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m dsl.validate FILE", file=sys.stderr)
        return 2
    ok, errors = validate_file(args[0])
    print("valid" if ok else "\n".join(errors))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
