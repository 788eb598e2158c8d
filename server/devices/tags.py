"""The tag syntax, shared by the API and the ``fleet`` CLI (no FastAPI or SQLAlchemy here: the
operator CLI runs on the base install).

A key is 1-63 characters of lowercase letters, digits, ``_``, ``.`` and ``-``, starting with a letter
or digit; a value is 1-128 characters of letters, digits, ``_``, ``.``, ``:``, ``/`` and ``-``,
starting with a letter or digit; at most 32 tags per device or token. A tag expression is
``key:value`` or ``key=value`` (the first separator splits).
"""

from __future__ import annotations

import re

from server.errors import Invalid

#: matched with ``fullmatch`` (``match`` with ``$`` would let a final newline through)
TAG_KEY_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}", re.ASCII)
TAG_VALUE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}", re.ASCII)
MAX_TAGS = 32


def check_tag(key: str, value: str) -> tuple[str, str]:
    if not TAG_KEY_RE.fullmatch(key):
        raise Invalid(f"invalid tag key {key!r}: lowercase letters, digits, '_', '.', '-'; max 63")
    if not TAG_VALUE_RE.fullmatch(value):
        raise Invalid(f"invalid tag value {value!r} for {key!r}: letters, digits, '_.:/-'; max 128")
    return key, value


def parse_tag_expr(expr: str) -> tuple[str, str]:
    """``key:value`` or ``key=value`` (the first separator splits) into a checked pair."""
    # spaces around it are trimmed; anything else (a newline, a tab) is left to the checks to refuse
    m = re.fullmatch(r"([^:=]*)[:=](.*)", expr.strip(" "), re.DOTALL)
    if not m:
        raise Invalid(f"invalid tag {expr!r}: expected key:value or key=value")
    return check_tag(m.group(1), m.group(2))


def parse_tags_csv(text: str) -> dict[str, str]:
    """``k=v,k2=v2`` into a dict (the CLI's ``--tags``)."""
    tags: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, v = parse_tag_expr(part)
        tags[k] = v
    return tags


def check_tags(tags: dict[str, str]) -> dict[str, str]:
    if len(tags) > MAX_TAGS:
        raise Invalid(f"at most {MAX_TAGS} tags")
    for k, v in tags.items():
        check_tag(k, v)
    return tags
