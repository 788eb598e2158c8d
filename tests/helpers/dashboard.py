"""Signing a TestClient in to the dashboard and reading the CSRF token of its pages."""

from __future__ import annotations

import re

CSRF = re.compile(r'name="csrf" value="([0-9a-f]{64})"')


def login(client, token: str):
    return client.post("/ui/login", data={"token": token, "next": "/ui/"}, follow_redirects=False)


def signed_in(client, token: str) -> str:
    """Sign ``client`` in; return the CSRF token of its pages."""
    r = login(client, token)
    assert r.status_code == 303, r.text
    page = client.get("/ui/")
    assert page.status_code == 200
    return CSRF.search(page.text).group(1)
