"""Hostile or mistaken input is refused before any trial launches, in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from sweeper.spec import validate
from tests.conftest import base_doc

ROOT = Path(__file__).resolve().parents[1]


def cli(spec: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweeper.run", str(spec), *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_trust_remote_code_is_off_unless_set(tmp_path: Path) -> None:
    assert validate(base_doc(tmp_path)).model.trust_remote_code is False
    doc = base_doc(tmp_path)
    doc["model"]["trust_remote_code"] = True
    assert validate(doc).model.trust_remote_code is True


def test_missing_model_directory_refused_before_trials(tmp_path: Path) -> None:
    doc = base_doc(tmp_path)
    doc["model"] = {"pretrained": str(tmp_path / "no-such-model")}
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(doc))
    r = cli(p)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: model.pretrained: directory '{tmp_path / 'no-such-model'}' does not exist")
    assert not (tmp_path / "results").exists()


def test_unreachable_hub_id_refused_before_trials(tmp_path: Path, monkeypatch) -> None:
    from sweeper.models import ModelError, check_loadable
    from sweeper.spec import ModelSpec

    # Offline mode makes the hub lookup fail at once, as on a machine with no network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    try:
        check_loadable(ModelSpec(pretrained="nobody/no-such-model-xyz"))
    except ModelError as e:
        msg = str(e)
    else:  # pragma: no cover
        raise AssertionError("an unreachable hub id was accepted")
    assert msg.startswith("model.pretrained: 'nobody/no-such-model-xyz'") and "\n" not in msg
