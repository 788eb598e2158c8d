"""A real Seldon MLServer serving a scikit-learn model, in a virtualenv of its own.

MLServer's pins may clash with the project's, so it lives in ``.venv-mlserver`` (what
``make test`` creates; :func:`mlserver_venv` creates it when missing). The model is trained and
saved by that virtualenv's own scikit-learn, so the joblib file always matches the one loading it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from server.mqtt.broker import free_port

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv-mlserver"
#: what ``make test`` writes once the install succeeded
STAMP = VENV / ".installed"
PACKAGES = ("mlserver", "mlserver-sklearn", "scikit-learn")

#: run by the MLServer virtualenv's Python: argv[1] holds x_train.npy, y_train.npy, x_val.npy
_TRAIN = """
import sys, joblib, numpy as np
from sklearn.linear_model import LogisticRegression
d = sys.argv[1]
x_train, y_train, x_val = (np.load(f"{d}/{n}.npy") for n in ("x_train", "y_train", "x_val"))
clf = LogisticRegression(max_iter=2000).fit(x_train, y_train)
joblib.dump(clf, f"{d}/model.joblib")
np.save(f"{d}/expected_proba.npy", clf.predict_proba(x_val))
np.save(f"{d}/expected_label.npy", clf.predict(x_val))
"""


class MlserverUnavailable(RuntimeError):
    """MLServer could not be installed (offline, no wheel for this Python)."""


def mlserver_venv() -> Path:
    """The MLServer virtualenv, created and installed when missing (minutes, once)."""
    if STAMP.exists():
        return VENV
    python = VENV / "bin" / "python"
    try:
        if not python.exists():
            subprocess.run(["python3", "-m", "venv", str(VENV)], check=True, capture_output=True, timeout=300)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", *PACKAGES],
            check=True,
            capture_output=True,
            timeout=1800,
        )
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or b"").decode(errors="replace").strip().splitlines()[-3:]
        raise MlserverUnavailable(f"installing {' '.join(PACKAGES)} into {VENV} failed: {tail}") from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MlserverUnavailable(f"installing {' '.join(PACKAGES)} into {VENV} failed: {exc}") from None
    STAMP.touch()
    return VENV


@dataclass(frozen=True)
class SklearnModel:
    """A model directory MLServer can serve, and what the model itself answers on ``x_val``."""

    directory: Path
    expected_proba: np.ndarray
    expected_label: np.ndarray


def train_model(
    venv: Path, directory: Path, name: str, version: str, split: tuple[np.ndarray, ...]
) -> SklearnModel:
    """A logistic regression on ``split`` (x_train, x_val, y_train, y_val) saved with joblib in
    ``directory`` next to its ``model-settings.json``."""
    x_train, x_val, y_train, _ = split
    directory.mkdir(parents=True)
    for n, a in (("x_train", x_train), ("y_train", y_train), ("x_val", x_val)):
        np.save(directory / f"{n}.npy", a)
    subprocess.run([str(venv / "bin" / "python"), "-c", _TRAIN, str(directory)], check=True, timeout=300)
    settings = {
        "name": name,
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib", "version": version},
    }
    (directory / "model-settings.json").write_text(json.dumps(settings))
    return SklearnModel(
        directory, np.load(directory / "expected_proba.npy"), np.load(directory / "expected_label.npy")
    )


class Mlserver:
    """``mlserver start`` on free ports (plain HTTP: MLServer 1.7 has no TLS setting for its REST
    server, so :func:`~tests.helpers.tls_proxy.tls_terminator` goes in front)."""

    def __init__(self, venv: Path, root: Path, model: str) -> None:
        self.port = free_port()
        settings = {
            "host": "127.0.0.1",
            "http_port": self.port,
            "grpc_port": free_port(),
            "metrics_port": free_port(),
            "parallel_workers": 0,
        }
        (root / "settings.json").write_text(json.dumps(settings))
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root.parent / "mlserver.log"
        self._log_fh = self.log.open("wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLSERVER_", "VIRTUAL_ENV"))}
        self.proc = subprocess.Popen(
            [str(venv / "bin" / "mlserver"), "start", str(root)],
            cwd=root,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self._wait_ready(model)

    def _wait_ready(self, model: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(trust_env=False) as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"mlserver exited ({self.proc.returncode}): {self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(f"{self.url}/v2/models/{model}/ready", timeout=2).status_code == 200:
                        return
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlserver not ready within {timeout:g} s: {self.log_tail()}")

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log_fh.close()
