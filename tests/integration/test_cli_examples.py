"""`fleet examples export MODEL --out hard.npz [--since] [--limit]` and `fleet examples purge`: the
CLI talks HTTP to the real app in-process; the examples are stored as the cloud tier stores them."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from server.cli import common, main
from server.client import FleetClient
from server.examples.service import keep

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture
def cli(app_client, monkeypatch, make_token):
    transport = app_client._transport
    monkeypatch.setattr(
        common,
        "api_client",
        lambda url, token, **kw: FleetClient("http://testserver", token, transport=transport),
    )

    def run(*args: str, role: str = "admin", code: int = 0) -> str:
        env = {"FLEET_TOKEN": make_token(role), "COLUMNS": "200"}
        result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
        assert result.exit_code == code, result.output
        return " ".join(result.output.split())

    return run


def test_export_writes_a_loadable_npz_and_purge_empties_it(cli, ctx, tmp_path):
    xs = [np.arange(6, dtype=np.float32).reshape(2, 3) + i for i in range(3)]
    with ctx.db.session_scope() as session:
        for i, x in enumerate(xs):
            keep(
                session, model="clf", version="1.0.0", device_id=f"dev-{i}",
                inputs={"x": x}, outputs={"y": x.sum(axis=1)}, model_cap=10**6, max_bytes=10**6,
            )  # fmt: skip
    out = tmp_path / "hard.npz"
    assert "3 examples of clf written" in cli("examples", "export", "clf", "--out", str(out), "--since", "1h")
    with np.load(out, allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["inputs/x"], np.concatenate(xs))
        np.testing.assert_array_equal(npz["outputs/y"], np.concatenate([x.sum(axis=1) for x in xs]))
        assert list(npz["rows"]) == [2, 2, 2]
        assert list(npz["device_ids"]) == ["dev-0", "dev-1", "dev-2"]
    assert "1 examples" in cli("examples", "export", "clf", "--out", str(out), "--limit", "1")
    with np.load(out, allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["inputs/x"], xs[2])

    refused = cli("examples", "export", "clf", "--out", str(tmp_path / "no.npz"), role="operator", code=1)
    assert "403" in refused or "admin" in refused
    assert not (tmp_path / "no.npz").exists()
    assert not (tmp_path / "no.npz.part").exists()
    assert "3 examples of clf deleted" in cli("examples", "purge", "clf", "--yes")
    assert "0 examples" in cli("examples", "export", "clf", "--out", str(out))
