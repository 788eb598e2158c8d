"""`fleet model sign` takes only an Ed25519 targets key: another kind of key file is refused before
any request, with a message naming the file."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server.cli import main


def test_a_targets_key_that_is_not_ed25519_is_refused(tmp_path: Path) -> None:
    key_path = tmp_path / "targets.key"
    key_path.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    # port 9 (discard) refuses connections: the command must stop before any request
    result = CliRunner().invoke(
        main, ["model", "sign", "--url", "http://127.0.0.1:9", "--token", "t", "--targets-key", str(key_path)]
    )
    assert result.exit_code == 1, result.output
    assert f"{key_path} is not an Ed25519 key" in result.output
