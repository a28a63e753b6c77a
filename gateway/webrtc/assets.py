"""The browser phone's files, served by the demo routes under /demo/phone.

`phone.html` and `phone.js` ship in `static/`; `jssip.js` is the browser bundle of npm's jssip
(CommonJS only) that scripts/setup.sh builds with esbuild into node_modules/.sautikit/.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STATIC_DIR = Path(__file__).resolve().parent / "static"
JSSIP_BUNDLE = ROOT / "node_modules" / ".sautikit" / "jssip.js"

CONTENT_TYPES = {
    "phone.html": "text/html; charset=utf-8",
    "phone.js": "text/javascript; charset=utf-8",
    "jssip.js": "text/javascript; charset=utf-8",
}


def asset(name: str) -> Path | None:
    """The file behind /demo/phone/<name> (phone.html, phone.js, jssip.js), or None if it is not
    one of them or is missing (the JsSIP bundle before scripts/setup.sh ran)."""
    if name == "jssip.js":
        # an installed (non-editable) package has no node_modules: a build may put the
        # bundle next to the page instead (static/jssip.js)
        path = JSSIP_BUNDLE if JSSIP_BUNDLE.is_file() else STATIC_DIR / name
    elif name in ("phone.html", "phone.js"):
        path = STATIC_DIR / name
    else:
        return None
    return path if path.is_file() else None
