"""Shared fixtures: an isolated cache with a tiny model pretrained in seconds, and a real S3
protocol server on 127.0.0.1 (moto's server mode)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Small enough to pretrain in a few seconds; big enough to classify above chance.
TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "pretrain_epochs": 12,
        "pretrain_per_class": 10, "image_size": 16, "patch_size": 8}
SYNTH = {"n_classes": 8, "train_per_class": 12, "val_per_class": 6, "image_size": 16, "seed": 0}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache per test session, shared by every test and every Ray worker."""
    d = tmp_path_factory.mktemp("sweeper-cache")
    os.environ["SWEEPER_CACHE"] = str(d)
    return d


def base_doc(tmp_path: Path, **overrides: object) -> dict:
    """A valid small search space as a dict; tests mutate it."""
    doc = {
        "name": "t",
        "storage": str(tmp_path / "results"),
        "model": {"pretrained": "tiny", "tiny": dict(TINY)},
        "variants": {"siglip": {"loss": "sigmoid", "freeze_vision": False},
                     "siglit": {"loss": "sigmoid", "freeze_vision": True}},
        "data": {"synthetic": dict(SYNTH), "templates": ["a photo of a {}."]},
        "train": {"epochs": 1, "lr": 1e-3},
        "grid": {"variant": ["siglip"], "text_source": ["templates"], "batch_size": [16],
                 "n_train_classes": [4], "seed": [0]},
        "scaling": {"num_workers": 1, "max_concurrent_trials": 1},
    }
    doc.update(overrides)
    return doc


def table_after(report: str, heading: str) -> list[list[str]]:
    """Cells of the first markdown table after `heading` in a report (header row included)."""
    lines = report[report.index(heading) :].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    rows = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        if not ln.startswith("|---"):
            rows.append([c.strip() for c in ln.strip("|").split(" | ")])
    return rows


# --------------------------------------------------------------------------- an S3 server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """A real S3 protocol server (moto's server mode) on 127.0.0.1, in its own process.
    `env` is what a client needs to reach it: the standard AWS_* variables, the endpoint
    in AWS_ENDPOINT_URL (what MinIO or Ceph users set)."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log = open(log, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 60
        while not self._up():
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"moto server did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
        self.env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint,
                    "AWS_EC2_METADATA_DISABLED": "true"}

    def _up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/moto-api/data.json", timeout=2):
                return True
        except OSError:
            return False

    def post(self, path: str, body: bytes = b"") -> None:
        """A call to moto's own control API (`/moto-api/...`)."""
        # text/plain: a form content type would hide the body from moto (Flask parses it).
        req = urllib.request.Request(f"{self.endpoint}{path}", data=body, method="POST",
                                     headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req, timeout=10).read()

    def bucket(self) -> str:
        """A new empty bucket."""
        import pyarrow.fs as pafs

        name = f"b-{uuid.uuid4().hex[:12]}"
        pafs.S3FileSystem(endpoint_override=self.endpoint, access_key="testing",
                          secret_key="testing", region="us-east-1",
                          allow_bucket_creation=True).create_dir(name)
        return name

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One S3 server for the session, its AWS_* variables set in this process (and so
    in every process it starts) while it runs."""
    pytest.importorskip("moto.server")
    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log")
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(scope="session")
def siglip2_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random SigLIP 2 checkpoints saved like the hub's (`save_pretrained` of model
    and processor): `naflex` (`Siglip2Model`, `Siglip2Processor`: a Siglip2ImageProcessor
    and a lower-casing `Siglip2Tokenizer`) and `fixres` (`SiglipModel` with a
    `SiglipProcessor` whose tokenizer is a plain Gemma one that does not lower-case, padded
    to max length, as the FixRes checkpoints ship it)."""
    from transformers import GemmaTokenizer, SiglipImageProcessorPil, SiglipProcessor

    from sweeper.models import build_tiny, build_tiny_siglip2, gemma_style_bpe
    from sweeper.spec import TinyModelSpec
    from sweeper.synthetic import vocabulary

    tiny = TinyModelSpec(**TINY)
    out = {}
    model, processor = build_tiny_siglip2(tiny, vocabulary())
    out["naflex"] = tmp_path_factory.mktemp("ckpt-naflex")
    model.save_pretrained(out["naflex"])
    processor.save_pretrained(out["naflex"])

    model, _ = build_tiny(TinyModelSpec(**TINY, max_length=64), vocabulary())
    words, merges = gemma_style_bpe(vocabulary())
    tokenizer = GemmaTokenizer(vocab=words, merges=merges, add_bos_token=False,
                               add_eos_token=True, padding_side="right", model_max_length=64)
    size = tiny.image_size
    processor = SiglipProcessor(
        image_processor=SiglipImageProcessorPil(size={"height": size, "width": size}),
        tokenizer=tokenizer)
    # The FixRes towers take Gemma's ids: its vocabulary replaces the word-level one.
    model.resize_token_embeddings(len(words), mean_resizing=False)
    model.config.text_config.update({"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2})
    out["fixres"] = tmp_path_factory.mktemp("ckpt-fixres")
    model.save_pretrained(out["fixres"])
    processor.save_pretrained(out["fixres"])
    return out
