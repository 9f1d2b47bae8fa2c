"""The console page (console.html, a package resource) and the headers it is served with.

One self-contained page: no external asset, no build step, so it works on a host with no
internet. It polls the JSON API every two seconds rather than holding a server-sent event
stream: the supervisor has nothing to push (the app asks it on every request anyway), so a
stream would only move the same polling into the server while tying up a connection per
open tab that the supervisor's shutdown has to cut; a poll is one short request that
survives a supervisor restart without reconnect logic.

The Content-Security-Policy allows exactly the page's own inline <script> and <style> (by
their SHA-256) and requests to this origin: were some value ever to reach the page as
markup, no script in it would run, and no other site may frame the console to click its
buttons.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.resources
import re

PAGE = "console.html"


def _hashes(page: bytes, tag: bytes) -> str:
    bodies = re.findall(rb"<" + tag + rb">(.*?)</" + tag + rb">", page, re.DOTALL)
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b).digest()).decode()}'"
                    for b in bodies)


def security_headers(page: bytes) -> dict[str, str]:
    policy = "; ".join([
        "default-src 'none'",
        f"script-src {_hashes(page, b'script')}",
        f"style-src {_hashes(page, b'style')}",
        "connect-src 'self'",
        "img-src data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ])
    return {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


@functools.cache
def console_page() -> tuple[bytes, dict[str, str]]:
    """(the page, its response headers); read once per process."""
    page = importlib.resources.files("mailpool.admin").joinpath(PAGE).read_bytes()
    return page, security_headers(page)
