"""Which targets the cloud tier serves (pure): FLEET_CLOUD_MODELS applied to a repository listing."""

from __future__ import annotations

import pytest

from server.cloud.selection import ModelSpec, parse_model_specs, select

SHA = {"sha256": "ab" * 32}


def target(model: str, version: str, release: int, variant: str = "default"):
    custom = {"model": model, "version": version, "release": release, "variant": variant, "constraints": {}}
    return f"{model}/{version}/{variant}/bundle.tar", (100, SHA, custom)


LISTED = dict(
    [
        target("clf", "1.0.0", 1),
        target("clf", "1.1.0", 2),
        target("clf", "2.0.0", 3),
        target("clf", "2.0.0", 3, variant="int8"),
        target("det", "0.1.0", 1),
        ("_fleet/director-keys.json", (50, SHA, None)),
        ("odd/target", (50, SHA, {"model": "clf", "version": "9.9.9", "release": "9", "variant": "default"})),
    ]
)


def test_specs_parse_names_and_pins():
    specs = parse_model_specs(["clf", " clf@1.0.0 ", "det@0.1.0"])
    assert specs == {
        "clf": ModelSpec("clf", latest=True, pinned=frozenset({"1.0.0"})),
        "det": ModelSpec("det", latest=False, pinned=frozenset({"0.1.0"})),
    }


@pytest.mark.parametrize(
    "entry", ["CLF", "clf@", "clf@v1", "clf@1.0", "@1.0.0", "clf\nx", "cl\u0430f", "a b", "x@1.0.0@2.0.0"]
)
def test_bad_specs_are_refused(entry):
    with pytest.raises(ValueError, match="invalid cloud model"):
        parse_model_specs([entry])


def test_latest_is_the_highest_release_of_the_variant():
    chosen = select(LISTED, parse_model_specs(["clf"]), "default")
    assert [(c.version, c.release) for c in chosen["clf"]] == [("2.0.0", 3)]
    assert set(chosen) == {"clf"}  # det is not named; the key list and a malformed target are ignored
    assert chosen["clf"][0].path == "clf/2.0.0/default/bundle.tar"


def test_pins_are_served_beside_the_latest_highest_first():
    chosen = select(LISTED, parse_model_specs(["clf", "clf@1.0.0", "clf@7.0.0", "det@0.1.0"]), "default")
    assert [c.version for c in chosen["clf"]] == ["2.0.0", "1.0.0"]  # 7.0.0 is not listed
    assert [c.version for c in chosen["det"]] == ["0.1.0"]


def test_another_variant_and_revocation():
    assert [c.version for c in select(LISTED, parse_model_specs(["clf"]), "int8")["clf"]] == ["2.0.0"]
    revoked = {p: t for p, t in LISTED.items() if not p.startswith("clf/2.0.0/")}
    assert [c.version for c in select(revoked, parse_model_specs(["clf"]), "default")["clf"]] == ["1.1.0"]
    assert select({}, parse_model_specs(["clf"]), "default") == {}
