"""Datasets in a bucket on a real S3 protocol server (moto's server mode, conftest.py;
nothing inside the process is mocked): the three formats read from `s3://` with their
class names beside them, WebDataset shards read in ranged requests (counted in the
server's log: one per shard and pass, never one per image), a trial that builds its
caches from shards in the bucket, and the refusals before any trial (a missing shard, an
unreachable endpoint, refused credentials; `--dry-run` included). Then one small Ray
sweep (slow): a 2-worker trial per format on the same data in the bucket."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from sweeper import data as D
from sweeper.data.shard import write_shards
from sweeper.spec import DataSpec, SpecError, validate
from sweeper.synthetic import dataset_dir
from tests.conftest import SYNTH, S3Server, base_doc, free_port
from tests.test_data import TF, FakeTokenizer, one_line
from tests.test_e2e import run_cli
from tests.test_storage import auth_s3  # noqa: F401 (a fixture: an IAM-checking server)

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("folder", "parquet", "webdataset")


def write_parquet(synth: Path, root: Path) -> None:
    """`<root>/{train,val}.parquet` of the folder dataset `synth`: a Hugging Face export's
    columns (image bytes and path, an int label, the captions)."""
    image_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for split in D.open_dataset(synth, "folder", "classes.json", "captions.jsonl").load():
        name = Path(split.samples[0].path).parts[-3]
        table = pa.table({
            "image": pa.array([{"bytes": Path(s.path).read_bytes(),
                                "path": "/".join(Path(s.path).parts[-3:])}
                               for s in split.samples], image_t),
            "label": [s.label for s in split.samples],
            "captions": [list(s.captions) for s in split.samples]})
        pq.write_table(table, root / f"{name}.parquet", row_group_size=16)


@pytest.fixture(scope="module")
def layouts(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One root holding the synthetic dataset in the three layouts: the folders
    `train/<wnid>/*.png`, the shards `train/*.tar` (the shard tool's, of 20 samples),
    `train.parquet`, the same for val, and `classes.json` (index -> [wnid, name])."""
    synth = dataset_dir(**SYNTH, cache_dir=cache_dir)
    root = tmp_path_factory.mktemp("layouts") / "data"
    shutil.copytree(synth, root)
    write_shards(synth, root, class_names="classes.json", captions="captions.jsonl",
                 maxcount=20)
    write_parquet(synth, root)
    return root


@pytest.fixture(scope="module")
def bucket_data(s3: S3Server, layouts: Path) -> str:
    """`s3://<bucket>/data`: `layouts` uploaded."""
    bucket = s3.bucket()
    fs, _ = pafs.FileSystem.from_uri(f"s3://{bucket}")
    pafs.copy_files(str(layouts), f"{bucket}/data", destination_filesystem=fs,
                    use_threads=False)
    return f"s3://{bucket}/data"


def gets(s3: S3Server, pattern: str) -> int:
    """GET requests for objects matching `pattern` in the server's log so far."""
    s3._log.flush()
    text = Path(s3._log.name).read_text(errors="replace")
    return len(re.findall(rf"GET /{pattern} HTTP", text))


def spec(root: str, fmt: str, **kw: Any) -> DataSpec:
    return DataSpec(root=root, format=fmt, class_names="classes.json", **kw)


def test_three_formats_read_from_a_bucket(s3: S3Server, layouts: Path, bucket_data: str
                                          ) -> None:
    bucket = bucket_data.split("/")[2]
    for fmt in FORMATS:
        remote = D.dataset_of(spec(bucket_data, fmt))
        local = D.dataset_of(spec(str(layouts), fmt))
        for r, ours in zip(remote.load(), local.load(), strict=True):
            assert r.wnids == ours.wnids and len(r.samples) == len(ours.samples) > 0
            assert [(s.label, s.captions) for s in r.samples] == \
                [(s.label, s.captions) for s in ours.samples]
            assert r.samples[0].path.startswith(f"{bucket}/data/")
        # The images: the same bytes as the local copy's.
        reader, mine = remote.reader(), local.reader()
        train = remote.split("train").samples[:5]
        here = local.split("train").samples[:5]
        assert [b for _, b in reader.stream(train)] == [b for _, b in mine.stream(here)]
    # Shards: one ranged request per shard and pass, whatever the number of images.
    shards = rf"{bucket}/data/train/train-\d+\.tar"
    ds = D.dataset_of(spec(bucket_data, "webdataset"))
    train = ds.split("train")  # indexed above: nothing read again
    before = gets(s3, shards)
    items = D.ImageTextDataset(train.samples, train.names, TF, ["{}"], "templates", 0,
                               reader=ds.reader())
    plan = D.batch_plan(items, 16, shuffle_buffer=8)
    loader = D.make_loader(items, plan, D.Collate(FakeTokenizer(), 8), 0)
    assert sum(b["size"] for b in loader) == 96 and gets(s3, shards) - before == 5


def test_trial_from_shards_in_a_bucket(s3: S3Server, bucket_data: str, cache_dir: Path,
                                       tmp_path: Path) -> None:
    """SigLiT on shards in the bucket: the frozen tower's feature cache is built by reading
    the shards front to back (2 DataLoader workers), then the trial trains on it."""
    from sweeper.prepare import with_model_path
    from sweeper.trials import resolve_trial
    from sweeper.worker import WorkerContext, run_trial

    doc = base_doc(tmp_path)
    doc["data"] = {"root": bucket_data, "format": "webdataset", "class_names": "classes.json",
                   "num_workers": 2}
    cfg = resolve_trial(validate(doc), {"variant": "siglit", "text_source": "mixed",
                                        "batch_size": 16, "n_train_classes": 4, "seed": 0})
    reports: list[dict] = []
    final = run_trial(with_model_path(cfg, cache_dir), WorkerContext(
        trial_dir=tmp_path / "trial", cache_dir=cache_dir,
        report=lambda m, ck: reports.append(m)))
    assert final["status"] == "terminated" and final["steps"] == 3
    assert final["skipped_images"] == 0 and reports[-1]["val_top1"] is not None
    status = (tmp_path / "trial" / "status.json").read_text()
    assert '"inputs": "features"' in status


def test_bucket_refusals_name_the_uri(s3: S3Server, bucket_data: str, auth_s3: dict,  # noqa: F811
                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(D.DataError) as e:
        D.dataset_of(spec(bucket_data, "webdataset",
                          train_shards="train/train-{000000..000007}.tar")).load()
    assert one_line(e) == (f"{bucket_data}/train/train-000005.tar: shard named by "
                           "data.train_shards not found")
    down = {"type": "s3", "endpoint_override": f"http://127.0.0.1:{free_port()}",
            "region": "us-east-1", "connect_timeout": 1, "request_timeout": 1}
    with pytest.raises(D.DataError) as e:
        D.dataset_of(spec(bucket_data, "folder", filesystem=down)).load()
    assert one_line(e).startswith(f"{bucket_data}: cannot reach the endpoint")
    with pytest.raises(SpecError, match=r"^data\.filesystem: secret_key: credentials do not"):
        validate(base_doc(tmp_path, data={"root": bucket_data, "filesystem": {
            "type": "s3", "secret_key": "x"}}))
    # Refused credentials, through the command line: exit 2 and one line, dry run or not.
    server, bucket = auth_s3["server"], auth_s3["bucket"]
    doc = base_doc(tmp_path)
    uri = f"s3://{bucket}/data"
    doc["data"] = {"root": uri, "format": "webdataset",
                   "filesystem": {"type": "s3", "endpoint_override": server.endpoint,
                                  "region": "us-east-1"}}
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(doc))
    env = {**os.environ, **server.env, "AWS_ACCESS_KEY_ID": "nobody"}
    for extra in (["--dry-run"], []):
        r = subprocess.run([sys.executable, "-m", "sweeper.run", str(p), *extra],
                           capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
        assert r.returncode == 2, r.stdout + r.stderr
        assert r.stderr.startswith(f"error: {uri}: the credentials were refused"), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_two_worker_trials_on_each_format_in_a_bucket(s3: S3Server, bucket_data: str,
                                                      cache_dir: Path, tmp_path: Path) -> None:
    """One Ray sweep, a trial per format (grid axis `data.format`) on the same data in the
    bucket, 2 workers each (one DataLoader worker each): all train the same steps on the
    same number of samples."""
    doc = base_doc(tmp_path, name="buckets")
    doc["data"] = {"root": bucket_data, "class_names": "classes.json"}
    doc["grid"]["data.format"] = list(FORMATS)
    doc["scaling"] = {"num_workers": 2, "resources_per_worker": {"CPU": 0.9},
                      "max_concurrent_trials": 1}
    p = tmp_path / "buckets.yaml"
    p.write_text(yaml.safe_dump(doc))
    r = run_cli(p, cache_dir, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trials = pd.read_parquet(tmp_path / "results" / "buckets" / "trials.parquet")
    assert sorted(trials["data__format"]) == sorted(FORMATS)
    assert set(trials["status"]) == {"terminated"}
    assert set(trials["steps"]) == {3} and set(trials["samples_seen"]) == {48}
    assert trials["data_wait_frac"].between(0, 1).all()
    report = (tmp_path / "results" / "buckets" / "report.md").read_text()
    assert "data wait %" in report
