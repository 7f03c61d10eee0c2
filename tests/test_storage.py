"""Storage on an object store, against a real S3 protocol server on 127.0.0.1 (moto's
server mode, started by conftest.py; nothing inside this process is mocked): locations,
the trial sink's whole-file uploads, the `storage_filesystem` key, the preflight's
refusals of unreachable or forbidden buckets, caches and preset models copied between
nodes, and the analysis of an experiment in a bucket. The Ray sweeps on S3 are in
test_s3_sweep.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pytest
import yaml

import analysis
from analysis.report import main as report_main
from sweeper import cache as C
from sweeper.preflight import preflight
from sweeper.prepare import node_local_model, publish_models
from sweeper.sink import TrialSink
from sweeper.spec import SpecError, spec_fingerprint
from sweeper.spec import validate as validate_spec
from sweeper.storage import Location, mirror_dir, publish_dir, pull_dir, resolve
from sweeper.trials import model_key, sweep_models, trial_configs
from tests.conftest import S3Server, base_doc, free_port
from tests.test_analysis import MAIN_GRID, make_experiment

ROOT = Path(__file__).resolve().parents[1]


def objects(loc: Location) -> dict[str, bytes]:
    """Every object under `loc`, by its path relative to it."""
    assert loc.fs is not None
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.fs_path, recursive=True,
                                                   allow_not_found=True))
    out = {}
    for i in infos:
        if i.type == pafs.FileType.File:
            with loc.fs.open_input_stream(i.path) as f:
                out[i.path[len(loc.fs_path) + 1:]] = f.read()
    return out


# --------------------------------------------------------------------------- locations


def test_location_on_s3(s3: S3Server, tmp_path: Path) -> None:
    bucket = s3.bucket()
    loc = resolve(f"s3://{bucket}/sweeps/")
    assert loc.remote and isinstance(loc.fs, pafs.S3FileSystem)
    assert str(loc) == f"s3://{bucket}/sweeps" and str(loc / "x") == f"s3://{bucket}/sweeps/x"
    f = loc / "exp" / "a.json"
    assert f.read_json() is None and not f.exists()
    f.write_json({"v": 1})
    f.write_json({"v": 2})  # replaced whole
    assert f.read_json() == {"v": 2} and f.is_file() and (loc / "exp").is_dir()
    assert loc.children() == ["exp"] and (loc / "exp").children() == ["a.json"]
    assert mirror_dir(loc, tmp_path) == tmp_path / "storage" / "s3" / bucket / "sweeps"
    # A folder published with its marker last is copied whole to another node.
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "w.bin").write_bytes(b"\0" * 1000)
    (src / "meta.json").write_text("{}")
    assert not pull_dir(loc / "store", tmp_path / "dst", "meta.json")  # nothing there yet
    publish_dir(src, loc / "store", "meta.json")
    assert pull_dir(loc / "store", tmp_path / "dst", "meta.json")
    assert (tmp_path / "dst" / "sub" / "w.bin").read_bytes() == b"\0" * 1000
    (loc / "exp").delete()
    assert not (loc / "exp").exists()
    # A local Location is a path, written atomically in place.
    local = resolve(tmp_path / "local")
    (local / "b.json").write_json([1])
    assert json.loads((tmp_path / "local" / "b.json").read_text()) == [1]
    assert mirror_dir(local) == tmp_path / "local"


def test_trial_sink_uploads_whole_files(s3: S3Server, tmp_path: Path) -> None:
    """The worker appends to its node-local copy and uploads each file whole; the driver
    updates status.json in the bucket directly; a sink on another node (or a fresh one on
    this node, whose copy is stale) starts from the bucket's files."""
    remote = resolve(f"s3://{s3.bucket()}/exp") / "trials" / "t1"
    worker = TrialSink(tmp_path / "nodeA", remote)
    for step in (0, 10, 20):
        worker.append_history({"step": step, "val_top1": step / 100})
        worker.append_per_class(step, {"n01": 0.5})
    up = objects(remote)
    assert [json.loads(ln)["step"] for ln in up["history.jsonl"].splitlines()] == [0, 10, 20]
    assert up["history.jsonl"] == (tmp_path / "nodeA" / "history.jsonl").read_bytes()
    driver = TrialSink.at(remote)
    assert driver.dir is None and [r["step"] for r in driver.history()] == [0, 10, 20]
    worker.update_status(status="running", restarts=0)
    driver.update_status(stopped_early=True)  # what Tune's callback does
    assert worker.status() == {"status": "running", "restarts": 0, "stopped_early": True}
    # A resume from the checkpoint at step 10 on another node.
    other = TrialSink(tmp_path / "nodeB", remote)
    other.truncate_after(10)
    assert [r["step"] for r in TrialSink(tmp_path / "nodeA", remote).history()] == [0, 10]
    assert [json.loads(ln)["step"] for ln in objects(remote)["per_class.jsonl"].splitlines()
            ] == [0, 10]
    other.write_json("nodes/0.json", {"rank": 0})
    assert (remote / "nodes" / "0.json").read_json() == {"rank": 0}
    # Local storage: the same sink, in place.
    local = TrialSink.at(resolve(tmp_path / "local"))
    local.append_history({"step": 0})
    assert (tmp_path / "local" / "history.jsonl").read_text().count("\n") == 1


# --------------------------------------------------------------------------- the spec key


def test_storage_filesystem_key(s3: S3Server, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = s3.bucket()
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    opts = {"type": "s3", "endpoint_override": s3.endpoint, "region": "us-east-1"}
    loc = resolve(f"s3://{bucket}/x", opts)
    (loc / "f").write_bytes(b"ok")
    assert (loc / "f").read_bytes() == b"ok"
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)  # S3FileSystem(...) reads it via us
    assert (resolve(f"s3://{bucket}/x", {"type": "s3"}) / "f").read_bytes() == b"ok"
    with pytest.raises(SpecError, match=r"^storage_filesystem\.endpointt: "):
        resolve(f"s3://{bucket}/x", {"type": "s3", "endpointt": "http://x"})
    with pytest.raises(SpecError, match=r"^storage_filesystem\.type: 'ftp' is not one of"):
        resolve("ftp://h/x", {"type": "ftp"})
    # Any fsspec protocol, by URI or by the key.
    mem = resolve("memory://sweeps")
    (mem / "a").write_bytes(b"1")
    assert (resolve("memory://other", {"type": "fsspec", "protocol": "memory"}).parent
            / "sweeps" / "a").read_bytes() == b"1"
    # Credentials never go into the spec (sweep.json is copied into the bucket).
    with pytest.raises(SpecError, match=r"^storage_filesystem: secret_key: credentials"):
        validate_spec(base_doc(tmp_path, storage_filesystem={"type": "s3", "secret_key": "x"}))
    # Where results go does not change what they are.
    here = validate_spec(base_doc(tmp_path))
    there = validate_spec(base_doc(tmp_path, storage=f"s3://{bucket}/x",
                                   storage_filesystem=opts))
    assert spec_fingerprint(here) == spec_fingerprint(there)


# --------------------------------------------------------------------------- preflight


@pytest.fixture(scope="module")
def auth_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A second S3 server that checks credentials and permissions (moto's IAM): a
    `writer` and a read-only `reader`, and a bucket."""
    pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    server = S3Server(tmp_path_factory.mktemp("s3auth") / "moto.log")
    try:
        bucket = server.bucket()
        iam = boto3.client("iam", endpoint_url=server.endpoint, region_name="us-east-1",
                           aws_access_key_id="x", aws_secret_access_key="x")
        keys = {}
        for user, actions in (("writer", ["s3:*"]),
                              ("reader", ["s3:GetObject", "s3:ListBucket"])):
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps({
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
            k = iam.create_access_key(UserName=user)["AccessKey"]
            keys[user] = {"AWS_ACCESS_KEY_ID": k["AccessKeyId"],
                          "AWS_SECRET_ACCESS_KEY": k["SecretAccessKey"]}
        server.post("/moto-api/reset-auth", b"0")  # from now on every request is checked
        yield {"server": server, "bucket": bucket, "keys": keys}
    finally:
        server.stop()


def test_preflight_refuses_buckets_it_cannot_use(auth_s3: dict, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    server, bucket, keys = auth_s3["server"], auth_s3["bucket"], auth_s3["keys"]
    uri = f"s3://{bucket}/sweeps"
    for k, v in server.env.items():
        monkeypatch.setenv(k, v)

    def refused(storage: str = uri, **env: str | None) -> str:
        with monkeypatch.context() as m:
            for k, v in env.items():
                if v is None:
                    m.delenv(k, raising=False)
                else:
                    m.setenv(k, v)
            with pytest.raises(SpecError) as e:
                preflight(validate_spec(base_doc(tmp_path, storage=storage)))
        assert "\n" not in str(e.value)
        return str(e.value)

    assert refused(**keys["reader"]).startswith(
        f"storage: '{uri}': cannot write there: access denied")
    assert refused(AWS_ACCESS_KEY_ID="nobody").startswith(
        f"storage: '{uri}': the credentials were refused")
    assert refused(AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None,
                   AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
                   AWS_CONFIG_FILE="/nonexistent").startswith(
        f"storage: '{uri}': no credentials were found")
    assert refused("s3://no-such-bucket/sweeps", **keys["writer"]).startswith(
        "storage: 's3://no-such-bucket/sweeps': cannot write there: the bucket does not exist")
    down = f"http://127.0.0.1:{free_port()}"
    assert refused(AWS_ENDPOINT_URL=down, **keys["writer"]).startswith(
        f"storage: '{uri}': cannot reach the endpoint")
    # The writer passes, and the write probe leaves nothing behind.
    for k, v in keys["writer"].items():
        monkeypatch.setenv(k, v)
    assert preflight(validate_spec(base_doc(tmp_path, storage=uri))).name == "t"
    assert resolve(uri).children() == []
    # The CLI: exit 2, one line, for a run and its dry run alike.
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(base_doc(tmp_path)))
    env = {**server.env, **keys["reader"]}
    r = subprocess.run([sys.executable, "-m", "sweeper.run", str(spec), "--dry-run",
                        "--storage", uri], capture_output=True, text=True, cwd=ROOT,
                       timeout=120, env={**os.environ, **env})
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith(f"error: storage: '{uri}': cannot write there: access denied")
    assert len(r.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- node-local copies


def test_store_built_on_one_node_is_copied_by_another(s3: S3Server, tmp_path: Path) -> None:
    """A cache store built on node A is uploaded (meta.json last); node B copies it into
    its own local cache instead of building it, and reads the same rows."""
    remote = resolve(f"s3://{s3.bucket()}/sweeps") / ".cache" / "features" / "k1"
    built = []

    def build(tmp: Path) -> dict:
        built.append(tmp)
        np.save(tmp / "data.npy", np.arange(12, dtype=np.float32).reshape(4, 3))
        np.save(tmp / "ok.npy", np.array([True, True, False, True]))
        return {"n": 4}

    a = C.ensure_store(tmp_path / "nodeA" / "features" / "k1", build, remote)
    assert len(built) == 1 and (remote / "meta.json").is_file()

    def never(tmp: Path) -> dict:
        raise AssertionError("node B rebuilt a store the bucket holds")

    b = C.ensure_store(tmp_path / "nodeB" / "features" / "k1", never, remote)
    assert b.dir == tmp_path / "nodeB" / "features" / "k1"
    assert np.array_equal(b.array, a.array) and np.array_equal(b.ok, a.ok)
    assert C.remote_cache(resolve("s3://b/sweeps/t/trials/x")) == resolve("s3://b/sweeps") \
        / ".cache" and C.remote_cache(None) is None


def test_preset_model_published_and_fetched(s3: S3Server, tmp_path: Path) -> None:
    storage = resolve(f"s3://{s3.bucket()}/sweeps")
    spec = validate_spec(base_doc(tmp_path))
    built = tmp_path / "nodeA" / "models" / "tiny-abc"
    built.mkdir(parents=True)
    (built / "model.safetensors").write_bytes(b"w" * 100)
    (built / "config.json").write_text("{}")
    paths = {model_key(m): str(built) for m in sweep_models(spec)}
    publish_models(spec, paths, storage)
    (cfg,) = trial_configs(spec, paths)
    assert node_local_model(cfg, storage, tmp_path / "nodeA") is cfg  # it has it
    shutil.rmtree(tmp_path / "nodeA")  # node B: the driver's path does not exist there
    moved = node_local_model(cfg, storage, tmp_path / "nodeB")
    assert moved.model_path == str(tmp_path / "nodeB" / "models" / "tiny-abc")
    assert (Path(moved.model_path) / "model.safetensors").read_bytes() == b"w" * 100


# --------------------------------------------------------------------------- analysis


def test_analysis_of_an_experiment_in_a_bucket(s3: S3Server, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    """`analysis.load` and `python -m analysis.report` on an s3:// experiment: the tables
    equal those of the same experiment on disk; the report's outputs go into the bucket,
    with a local copy named on the command line."""
    exp = make_experiment(tmp_path / "disk", "toy", MAIN_GRID)
    storage = resolve(f"s3://{s3.bucket()}/sweeps")
    for f in sorted(p for p in exp.rglob("*") if p.is_file()):
        (storage / "toy" / f.relative_to(exp).as_posix()).upload(f)
    uri = f"{storage}/toy"
    local_trials, local_history = analysis.load(exp)
    trials, history = analysis.load(uri)  # built in memory: nothing written to the bucket
    assert "trials.parquet" not in (storage / "toy").children()
    drop = ["trial_path", "tune_path"]
    pd.testing.assert_frame_equal(trials.drop(columns=drop), local_trials.drop(columns=drop))
    pd.testing.assert_frame_equal(history, local_history)
    assert trials["trial_path"].str.startswith(f"{uri}/trials/").all()

    assert report_main([uri]) == 0
    out = capsys.readouterr().out
    copy = mirror_dir(storage / "toy")
    assert f"report: {uri}/report.md (local copy: {copy / 'report.md'})" in out
    up = objects(storage / "toy")
    assert up["report.md"] == (copy / "report.md").read_bytes()
    assert up["trials.parquet"] == (copy / "trials.parquet").read_bytes()
    assert any(k.startswith("plots/") and k.endswith(".png") for k in up)
    trials2, _ = analysis.load(uri)  # now read from the bucket's Parquet
    pd.testing.assert_frame_equal(trials2, trials)
