"""Signing a TestClient in to the dashboard (through its login form, with the form's double-submit
token) and reading the CSRF token of its pages."""

from __future__ import annotations

import re

CSRF = re.compile(r'name="csrf" value="([0-9a-f]{64})"')


def login(client, token: str, next: str = "/ui/", base: str = ""):
    """Load the sign-in form (its pre-session cookie and hidden token), then post ``token``."""
    form = client.get(f"{base}/ui/login")
    assert form.status_code == 200, form.text
    data = {"token": token, "next": next, "csrf": CSRF.search(form.text).group(1)}
    return client.post(f"{base}/ui/login", data=data, follow_redirects=False)


def signed_in(client, token: str) -> str:
    """Sign ``client`` in; return the CSRF token of its pages."""
    r = login(client, token)
    assert r.status_code == 303, r.text
    page = client.get("/ui/")
    assert page.status_code == 200
    return CSRF.search(page.text).group(1)
