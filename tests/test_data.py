"""Real-data layouts on small datasets built here: ImageNet-style folders (JPEG/PNG, any
case of extension), every class-names and captions format, a Parquet export with image
bytes, text sources, class subsets, preprocessing against the HF processors, bad data and
every refusal; one end-to-end sweep on the folder layout through the CLI (slow)."""

from __future__ import annotations

import csv
import io
import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from sweeper import data as D
from sweeper.spec import DataSpec
from tests.conftest import TINY, base_doc

ROOT = Path(__file__).resolve().parents[1]
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475"]
NAMES = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark",
         "n01491361": "tiger shark", "n01494475": "hammerhead"}
EXTS = [".JPEG", ".jpg", ".png", ".Jpeg"]


def jpeg_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (20, 14),
               fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(sum(colour))
    arr = (np.array(colour) + rng.integers(-20, 20, (size[1], size[0], 3))).clip(0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), "RGB").save(buf, fmt)
    return buf.getvalue()


def make_folder(root: Path, wnids: list[str] = WNIDS, n_train: int = 4, n_val: int = 2,
                names: dict[str, str] | None = NAMES, captions: bool = True) -> Path:
    """root/{train,val}/<wnid>/<wnid>_<i><ext> (mixed extensions, JPEG and PNG bytes),
    classes.json, and captions.jsonl with two captions for every train image but the last
    of each class."""
    records = []
    for c, w in enumerate(wnids):
        for split, n in (("train", n_train), ("val", n_val)):
            d = root / split / w
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                ext = EXTS[(c + i) % len(EXTS)]
                fmt = "PNG" if ext == ".png" else "JPEG"
                name = f"{w}_{split}{i}{ext}"
                (d / name).write_bytes(jpeg_bytes((40 * c, 200 - 30 * c, 90), fmt=fmt))
                if split == "train" and i < n - 1:
                    records.append({"image": f"{split}/{w}/{name}",
                                    "captions": [f"{w} picture {i} a", f"{w} picture {i} b"]})
    if names is not None:
        (root / "classes.json").write_text(json.dumps({w: names[w] for w in wnids}))
    if captions:
        (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def spec(root: Path | None, **kw) -> DataSpec:
    return DataSpec(root=str(root) if root else None, **kw)


TF = D.ImageTransform(16, 16, None, None, Image.BICUBIC, 1 / 255, (0.5,) * 3, (0.5,) * 3)


class FakeTokenizer:
    def __call__(self, texts, padding=None, truncation=None, max_length=8, return_tensors=None):
        ids = torch.tensor([[len(t) % 97 + 1] * max_length for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------- folders


def test_folder_counts_labels_and_extensions(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "ds")
    (root / "train" / WNIDS[0] / "notes.txt").write_text("not an image")
    (root / "train" / ".cache").mkdir()
    train, val = D.open_dataset(root, "folder", "classes.json", "captions.jsonl").load()
    assert train.wnids == WNIDS and val.wnids == WNIDS
    assert train.names == [NAMES[w] for w in WNIDS]
    assert len(train.samples) == 5 * 4 and len(val.samples) == 5 * 2
    for s in train.samples:
        assert Path(s.path).parent.name == WNIDS[s.label]
    assert {Path(s.path).suffix for s in train.samples} == set(EXTS)
    with_caps = [s for s in train.samples if s.captions]
    assert len(with_caps) == 5 * 3 and all(len(s.captions) == 2 for s in with_caps)
    # Class names are optional for folders: the wnid is the name.
    train2, _ = D.open_dataset(root, "folder", None, None).load()
    assert train2.names == WNIDS and not any(s.captions for s in train2.samples)


@pytest.mark.parametrize("fmt", ["json", "synonyms", "keras", "csv", "csv_noheader", "tsv",
                                 "txt"])
def test_class_name_formats(tmp_path: Path, fmt: str) -> None:
    names = {**NAMES, "n01484850": "great_white_shark" if fmt == "keras" else "great white shark"}
    if fmt == "json":
        p = tmp_path / "c.json"
        p.write_text(json.dumps(names))
    elif fmt == "synonyms":
        p = tmp_path / "c.json"
        p.write_text(json.dumps({w: [n, "another name"] for w, n in names.items()}))
    elif fmt == "keras":
        p = tmp_path / "imagenet_class_index.json"
        p.write_text(json.dumps({str(i): [w, names[w]] for i, w in enumerate(WNIDS)}))
    elif fmt in ("csv", "csv_noheader", "tsv"):
        p = tmp_path / ("c.tsv" if fmt == "tsv" else "c.csv")
        with open(p, "w", newline="") as f:
            wr = csv.writer(f, delimiter="\t" if fmt == "tsv" else ",")
            if fmt != "csv_noheader":
                wr.writerow(["wnid", "name"])
            wr.writerows(names.items())
    else:
        p = tmp_path / "LOC_synset_mapping.txt"
        p.write_text("".join(f"{w} {n}\n" for w, n in names.items()))
    table = D.read_class_table(p)
    assert [w for w, _ in table.entries] == WNIDS  # file (index) order
    assert D.read_class_names(p) == NAMES  # Keras underscores become spaces


def test_missing_class_name_names_the_wnid(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "ds")
    (root / "classes.json").write_text(json.dumps({w: NAMES[w] for w in WNIDS[:4]}))
    with pytest.raises(D.DataError) as e:
        D.open_dataset(root, "folder", root / "classes.json", None).load()
    assert f"'{WNIDS[4]}'" in one_line(e) and "data.class_names" in one_line(e)


# --------------------------------------------------------------------------- captions


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "parquet"])
def test_caption_formats(tmp_path: Path, fmt: str) -> None:
    rows = [("train/n1/a.JPEG", "first caption of a"), ("train/n1/a.JPEG", "second of a"),
            ("b", "only caption of b"), ("c.jpg", "caption of c by file name")]
    p = tmp_path / f"caps.{fmt}"
    if fmt == "jsonl":
        p.write_text("".join(json.dumps({"image": k, "caption": c}) + "\n" for k, c in rows)
                     + "\n" + json.dumps({"id": "d", "captions": ["d1", "d2"]}) + "\n")
    elif fmt in ("csv", "tsv"):
        with open(p, "w", newline="") as f:
            wr = csv.writer(f, delimiter="\t" if fmt == "tsv" else ",")
            wr.writerow(["image", "caption"])
            wr.writerows([*rows, ("d", "d1"), ("d", "d2")])
    else:
        pq.write_table(pa.table({"image": [k for k, _ in rows] + ["d"],
                                 "captions": [[c] for _, c in rows] + [["d1", "d2"]]}), p)
    caps = D.read_captions(p)
    assert caps["train/n1/a.JPEG"] == ("first caption of a", "second of a")
    assert caps["b"] == ("only caption of b",)
    assert caps["c"] == ("caption of c by file name",)
    assert caps["d"] == ("d1", "d2")


def test_caption_matched_by_path_or_id(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "ds", captions=False)
    first = sorted((root / "train" / WNIDS[1]).iterdir())[0]
    (root / "caps.jsonl").write_text(
        json.dumps({"image": f"train/{WNIDS[0]}/{WNIDS[0]}_train0.JPEG", "caption": "by path"})
        + "\n" + json.dumps({"id": first.stem, "caption": "by id"}) + "\n")
    train, _ = D.open_dataset(root, "folder", None, root / "caps.jsonl").load()
    by_path = {Path(s.path).name: s.captions for s in train.samples if s.captions}
    assert by_path == {f"{WNIDS[0]}_train0.JPEG": ("by path",), first.name: ("by id",)}


def test_caption_choice_per_epoch(tmp_path: Path) -> None:
    s = D.Sample("x.jpg", 0, ("c0", "c1", "c2"))
    draws = [D.pick_text(s, "tench", ["{}"], "captions", 0, epoch, 5) for epoch in range(12)]
    again = [D.pick_text(s, "tench", ["{}"], "captions", 0, epoch, 5) for epoch in range(12)]
    assert draws == again  # deterministic
    assert len(set(draws)) > 1  # changes across epochs
    other = [D.pick_text(s, "tench", ["{}"], "captions", 1, epoch, 5) for epoch in range(12)]
    assert other != draws  # depends on the seed
    # Through the dataset, keyed by (index, epoch) as the sampler yields them.
    img = tmp_path / "x.jpg"
    img.write_bytes(jpeg_bytes((10, 20, 30)))
    ds = D.ImageTextDataset([D.Sample(str(img), 0, ("c0", "c1", "c2"))], ["tench"], TF,
                            ["{}"], "captions", 0)
    assert [ds[(0, e)]["text"] for e in range(12)] == [
        D.pick_text(ds.samples[0], "tench", ["{}"], "captions", 0, e, 0) for e in range(12)]


def test_text_sources() -> None:
    with_cap, without = D.Sample("a", 0, ("a caption",)), D.Sample("b", 0, ())
    templates = ["a photo of a {}.", "a drawing of a {}.", "{} in the wild"]
    drawn = {D.pick_text(without, "tench", templates, "templates", 0, 0, i) for i in range(40)}
    assert drawn == {t.format("tench") for t in templates}  # one drawn per sample
    assert D.pick_text(with_cap, "tench", templates, "templates", 0, 0, 0) in drawn
    assert D.pick_text(with_cap, "tench", templates, "captions", 0, 0, 0) == "a caption"
    assert D.pick_text(without, "tench", templates, "captions", 0, 0, 0) is None
    assert D.pick_text(with_cap, "tench", templates, "mixed", 0, 0, 0) == "a caption"
    assert D.pick_text(without, "tench", templates, "mixed", 0, 0, 0) in drawn
    # One template may be given as a string; eval templates default to the templates.
    ds = DataSpec(root="/x", templates="a photo of a {}.")
    assert ds.templates == ["a photo of a {}."] and ds.eval_templates is None


# --------------------------------------------------------------------------- subsets


def test_class_subsets() -> None:
    wnids = [f"n{i:08d}" for i in range(20)]
    a = D.choose_train_classes(wnids, 5, seed=3)
    assert a == D.choose_train_classes(list(reversed(wnids)), 5, seed=3)  # deterministic
    assert len(set(a)) == 5 and set(a) <= set(wnids)
    assert len({tuple(D.choose_train_classes(wnids, 5, seed=s)) for s in range(6)}) > 1
    assert D.choose_train_classes(wnids, 3, 0, "sorted") == wnids[:3]
    assert D.choose_train_classes(wnids, 2, 0, explicit=[wnids[7], wnids[2], wnids[9]]) == [
        wnids[7], wnids[2]]
    with pytest.raises(D.DataError, match=r"^data\.train_classes\[1\]: unknown class 'nx'"):
        D.choose_train_classes(wnids, 1, 0, explicit=[wnids[0], "nx"])
    with pytest.raises(D.DataError, match=r"^n_train_classes: 3 exceeds the 2 classes"):
        D.choose_train_classes(wnids, 3, 0, explicit=wnids[:2])
    with pytest.raises(D.DataError, match=r"^n_train_classes: 21 exceeds"):
        D.choose_train_classes(wnids, 21, 0)


def test_trial_data_seen_unseen_and_captions(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "ds")
    ds = spec(root, class_names="classes.json", captions="captions.jsonl",
              templates=["a photo of a {}.", "a {}"])
    td = D.build_trial_data(ds, "captions", 2, 7, TF)
    again = D.build_trial_data(ds, "captions", 2, 7, TF)
    assert td.train_classes == again.train_classes == D.choose_train_classes(WNIDS, 2, 7)
    assert td.train_class_names == [NAMES[w] for w in td.train_classes]
    assert len(td.train) == 2 * 3 and td.left_out_no_caption == 2
    assert {WNIDS[s.label] for s in td.train.samples} == set(td.train_classes)
    assert td.val_wnids == WNIDS and len(td.val_samples) == 10  # every val class
    assert td.seen == [w in td.train_classes for w in WNIDS]
    assert td.eval_templates == ["a photo of a {}.", "a {}"]
    mixed = D.build_trial_data(ds, "mixed", 2, 7, TF)
    assert len(mixed.train) == 8 and mixed.left_out_no_caption == 0
    # Explicit lists and eval classes.
    ds2 = spec(root, class_names="classes.json", train_classes=[WNIDS[3], WNIDS[0]],
               eval_classes=[WNIDS[0], WNIDS[1]], eval_templates=["itap of a {}."])
    td2 = D.build_trial_data(ds2, "templates", 1, 0, TF)
    assert td2.train_classes == [WNIDS[3]] and td2.val_wnids == WNIDS[:2]
    assert td2.seen == [False, False] and {s.label for s in td2.val_samples} == {0, 1}
    assert td2.eval_templates == ["itap of a {}."]
    sorted_ = D.build_trial_data(spec(root, class_order="sorted"), "templates", 3, 5, TF)
    assert sorted_.train_classes == WNIDS[:3]


# --------------------------------------------------------------------------- loading


def test_loader_batches_and_workers(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "ds")
    td = D.build_trial_data(spec(root, captions="captions.jsonl"), "mixed", 5, 0, TF)
    collate = D.Collate(FakeTokenizer(), 8)

    def run(workers: int) -> list[dict]:
        sampler = D.GlobalBatchSampler(len(td.train), 8, seed=1, epoch=2)
        return list(D.make_loader(td.train, sampler, collate, workers))

    inline, pooled = run(0), run(2)
    assert [b["size"] for b in inline] == [8, 8]
    for a, b in zip(inline, pooled, strict=True):
        assert a["pixel_values"].shape == (8, 3, 16, 16)
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"],
                                                                          b["labels"])
    # The batch path and the one-item path give the same pixels.
    one = td.train[(int(inline[0]["index"][0]), 2)]["pixel_values"]
    assert torch.equal(one, inline[0]["pixel_values"][0])


def test_corrupt_images_skipped_and_counted(tmp_path: Path, caplog) -> None:
    root = make_folder(tmp_path / "ds", wnids=WNIDS[:2], n_train=4)
    d = root / "train" / WNIDS[0]
    good = sorted(d.glob("*.JPEG"))[0].read_bytes()
    (d / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (d / "garbage.jpg").write_bytes(b"this is not a jpeg at all")
    (d / "empty.png").write_bytes(b"")
    train, _ = D.open_dataset(root, "folder", None, None).load()
    bad = {i for i, s in enumerate(train.samples) if Path(s.path).stem in
           ("truncated", "garbage", "empty")}
    assert len(bad) == 3
    collate = D.Collate(FakeTokenizer(), 8)
    caplog.set_level(logging.WARNING, logger="sweeper.data")
    # Evaluation: bad items are left out and counted.
    ds = D.ImageTextDataset(train.samples, train.names, TF, ["{}"], "templates", 0)
    batches = [[(i, 0) for i in range(len(ds))]]
    out = [next(iter(D.make_loader(ds, batches, collate, 0))) for _ in range(2)]
    assert out[0]["skipped"] == 3 and out[0]["size"] == len(ds) - 3
    assert bad.isdisjoint(out[0]["index"].tolist())
    logged = [r.getMessage() for r in caplog.records if "skipping unreadable" in r.getMessage()]
    assert len(logged) == 3  # once per path, though read twice
    assert any(str(d / "truncated.JPEG") in m for m in logged)
    # Training: a readable neighbour takes the bad item's place (equal shards on every
    # rank), still counted.
    tr = D.ImageTextDataset(train.samples, train.names, TF, ["{}"], "templates", 0,
                            substitute_bad=True)
    b = collate(tr.__getitems__([(i, 0) for i in sorted(bad)] + [(0, 0)]))
    assert b["size"] == 4 and b["skipped"] >= 3 and b["pixel_values"].shape[0] == 4
    assert bad.isdisjoint(b["index"].tolist())


def test_decompression_bomb_skipped(tmp_path: Path, monkeypatch) -> None:
    p_warn, p_err = tmp_path / "warn.png", tmp_path / "err.png"
    Image.new("RGB", (30, 30)).save(p_warn)  # 900 px: over the limit, under twice it
    Image.new("RGB", (50, 50)).save(p_err)  # 2500 px: over twice the limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)
    ds = D.ImageTextDataset([D.Sample(str(p_warn), 0), D.Sample(str(p_err), 0)], ["x"], TF,
                            ["{}"], "templates", 0)
    assert ds[0] == {"skipped": 1} and ds[1] == {"skipped": 1}
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    assert ds[0]["pixel_values"].shape == (3, 16, 16)


def test_symlinks_leaving_root_not_followed(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "ds", wnids=WNIDS[:2], names=None, captions=False)
    outside = tmp_path / "outside"
    (outside / "cls").mkdir(parents=True)
    (outside / "cls" / "x.jpg").write_bytes(jpeg_bytes((1, 2, 3)))
    (root / "train" / WNIDS[0] / "escape.jpg").symlink_to(outside / "cls" / "x.jpg")
    (root / "train" / "n09999999").symlink_to(outside / "cls", target_is_directory=True)
    inner = root / "train" / WNIDS[1] / sorted(p.name for p in (root / "train" / WNIDS[1])
                                                .iterdir())[0]
    (root / "train" / WNIDS[0] / "inside.jpg").symlink_to(inner)  # stays inside: followed
    train, _ = D.open_dataset(root, "folder", None, None).load()
    names = {Path(s.path).name for s in train.samples}
    assert "escape.jpg" not in names and "inside.jpg" in names
    assert train.wnids == WNIDS[:2]


def test_long_and_undecodable_captions(tmp_path: Path) -> None:
    big = "word " * 2_000_000  # a 10 MB caption line
    p = tmp_path / "caps.jsonl"
    p.write_text(json.dumps({"image": "a", "caption": big}) + "\n"
                 + json.dumps({"image": "b", "caption": "short"}) + "\n")
    caps = D.read_captions(p)
    assert len(caps["a"][0]) == D.MAX_CAPTION_CHARS and caps.truncated == 1
    assert caps["b"] == ("short",)
    c = tmp_path / "caps.csv"
    c.write_text(f"image,caption\na,{big}\nb,short\n")
    caps = D.read_captions(c)
    assert len(caps["a"][0]) == D.MAX_CAPTION_CHARS and caps.truncated == 1
    for bad, suffix in ((b'{"image": "a", "caption": "caf\xe9"}\n', "jsonl"),
                        (b"image,caption\nb,ok\na,caf\xe9\n", "csv")):
        f = tmp_path / f"bad.{suffix}"
        f.write_bytes(bad)
        with pytest.raises(D.DataError) as e:
            D.read_captions(f)
        assert one_line(e).startswith(str(f)) and "UTF-8" in one_line(e)


# --------------------------------------------------------------------------- refusals


def _no_train(r: Path) -> None:
    import shutil

    shutil.rmtree(r / "train")


def _no_val(r: Path) -> None:
    import shutil

    shutil.rmtree(r / "val")


def _empty_classes(r: Path) -> None:
    import shutil

    shutil.rmtree(r / "val")
    (r / "val").mkdir()


def _caps_no_match(r: Path) -> None:
    (r / "captions.jsonl").write_text(json.dumps({"image": "train/zz/q.jpg", "caption": "x"})
                                      + "\n")


def _caps_dotdot(r: Path) -> None:
    (r / "captions.jsonl").write_text(json.dumps({"image": "../secret/x.jpg", "caption": "x"})
                                      + "\n")


def _caps_abs(r: Path) -> None:
    (r / "captions.jsonl").write_text(json.dumps({"image": "/etc/passwd", "caption": "x"})
                                      + "\n")


def _caps_empty(r: Path) -> None:
    (r / "captions.jsonl").write_text("")


@pytest.mark.parametrize(("mutate", "where", "words"), [
    (_no_train, "train", "missing split folder"),
    (_no_val, "val", "missing split folder"),
    (_empty_classes, "val", "no class folders"),
    (_caps_no_match, "captions.jsonl", "no caption matches any image"),
    (_caps_empty, "captions.jsonl", "no caption matches any image"),
    (_caps_dotdot, "captions.jsonl", "'../secret/x.jpg' points outside the data root"),
    (_caps_abs, "captions.jsonl", "'/etc/passwd' points outside the data root"),
])
def test_folder_refusals_name_the_path(tmp_path: Path, mutate, where: str, words: str) -> None:
    root = make_folder(tmp_path / "ds", wnids=WNIDS[:2], n_train=2, n_val=1)
    mutate(root)
    with pytest.raises(D.DataError) as e:
        D.check_dataset(spec(root, class_names="classes.json", captions="captions.jsonl"))
    msg = one_line(e)
    assert str(root / where) in msg and words in msg


def test_spec_level_refusals(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "ds", wnids=WNIDS[:3], n_train=2, n_val=1)
    cases = [
        (spec(root, train_classes=[WNIDS[0], "n0bad"]), (2,), (),
         "data.train_classes[1]: unknown class 'n0bad'"),
        (spec(root, train_classes=[WNIDS[0]]), (1, 2), (),
         "n_train_classes: 2 exceeds the 1 classes of data.train_classes"),
        (spec(root, eval_classes=["n0bad"]), (1,), (),
         "data.eval_classes[0]: class 'n0bad' is not in the val split"),
        (spec(tmp_path / "nope"), (1,), (), f"{tmp_path / 'nope'}: data root not found"),
        (spec(root, class_names="missing.json"), (1,), (), "missing.json: class-names file"),
    ]
    for ds, ks, sources, expected in cases:
        with pytest.raises(D.DataError) as e:
            D.check_dataset(ds, ks, sources)
        assert expected in one_line(e)
    val_image = next((root / "val" / WNIDS[0]).iterdir()).relative_to(root).as_posix()
    (root / "captions.jsonl").write_text(json.dumps({"image": val_image, "caption": "c"}) + "\n")
    with pytest.raises(D.DataError, match="no training image has a caption"):
        D.check_dataset(spec(root, captions="captions.jsonl"), (1,), ("captions",))


def test_cli_refuses_bad_data_before_any_trial(tmp_path: Path, capsys) -> None:
    from sweeper.run import main

    root = make_folder(tmp_path / "ds", wnids=WNIDS[:2], n_train=2, n_val=1)
    _no_val(root)
    doc = base_doc(tmp_path)
    doc["data"] = {"root": str(root), "class_names": "classes.json",
                   "captions": "captions.jsonl"}
    doc["grid"]["n_train_classes"] = [1]
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(doc))
    assert main([str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {root / 'val'}: missing split folder"]
    assert not (tmp_path / "results").exists()
    # The Parquet layout is checked there too.
    doc["data"] = {"root": str(root), "format": "parquet"}
    p.write_text(yaml.safe_dump(doc))
    assert main([str(p)]) == 2
    assert "train: missing split" in capsys.readouterr().err


# --------------------------------------------------------------------------- parquet


def write_export(path: Path, rows: list[tuple[bytes | None, str, object, object]],
                 hf_names: list[str] | None = None, row_group_size: int = 3) -> None:
    """A Parquet file laid out like a Hugging Face `datasets` export."""
    image_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cols = {"image": pa.array([{"bytes": b, "path": p} for b, p, _, _ in rows], image_t),
            "label": [lab for _, _, lab, _ in rows]}
    if any(c is not None for *_, c in rows):
        cols["caption"] = [c for *_, c in rows]
    table = pa.table(cols)
    if hf_names:
        meta = {"info": {"features": {"image": {"_type": "Image"},
                                      "label": {"names": hf_names, "_type": "ClassLabel"}}}}
        table = table.replace_schema_metadata({b"huggingface": json.dumps(meta).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)


def make_parquet(root: Path, labels: str = "int", hf: bool = True) -> Path:
    """train-0000{0,1}-of-00002.parquet (HF hub naming) and validation/*.parquet."""
    def rows(split: str, n: int) -> list:
        out = []
        for c, w in enumerate(WNIDS[:3]):
            for i in range(n):
                lab = c if labels == "int" else w
                cap = f"{NAMES[w]} number {i}" if i % 2 == 0 else None
                out.append((jpeg_bytes((60 * c, 50, 200 - 60 * c)), f"{w}_{split}{i}.JPEG",
                            lab, cap))
        return out
    hf_names = WNIDS[:3] if hf and labels == "int" else None
    train = rows("train", 4)
    write_export(root / "train-00000-of-00002.parquet", train[:7], hf_names)
    write_export(root / "train-00001-of-00002.parquet", train[7:], hf_names)
    write_export(root / "validation" / "part-0.parquet", rows("val", 2), hf_names)
    return root


def test_parquet_export_read_lazily(tmp_path: Path, monkeypatch) -> None:
    root = make_parquet(tmp_path / "pq")
    (root / "classes.json").write_text(json.dumps(NAMES))
    reads: list[tuple[str, int, tuple]] = []
    real = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kw):
        reads.append((Path(str(self.reader.__class__)).name, i, tuple(columns or ())))
        return real(self, i, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    dataset = D.open_dataset(root, "parquet", root / "classes.json", None)
    train, val = dataset.load()
    assert all("image" not in cols for _, _, cols in reads)  # no image bytes while indexing
    assert train.wnids == WNIDS[:3] and train.names == [NAMES[w] for w in WNIDS[:3]]
    assert len(train.samples) == 12 and len(val.samples) == 6
    assert [s.label for s in train.samples] == [c for c in range(3) for _ in range(4)]
    assert sum(bool(s.captions) for s in train.samples) == 6
    assert {s.at[0] for s in train.samples} == {0, 1, 2}
    # Images come a row group at a time through a small per-process LRU.
    ds = D.ImageTextDataset(train.samples, train.names, TF, ["{}"], "mixed", 0,
                            reader=dataset.reader())
    reads.clear()
    items = [ds[i] for i in range(len(ds))]
    assert all(it["pixel_values"].shape == (3, 16, 16) for it in items)
    assert len(reads) == 5 and all(cols == ("image",) for _, _, cols in reads)
    ref = TF(Image.open(io.BytesIO(jpeg_bytes((0, 50, 200)))))
    assert torch.equal(items[0]["pixel_values"], ref)
    # The trial path: a class subset, text sources, the loader.
    td = D.build_trial_data(spec(root, format="parquet"), "captions", 2, 0, TF)
    assert len(td.train) == 4 and td.left_out_no_caption == 4
    batch = next(iter(D.make_loader(td.train, D.GlobalBatchSampler(4, 4), D.Collate(
        FakeTokenizer(), 8), 0)))
    assert batch["size"] == 4 and batch["skipped"] == 0


@pytest.mark.parametrize("case", ["wnid_labels", "keras_names", "hf_names_only"])
def test_parquet_class_names(tmp_path: Path, case: str) -> None:
    root = make_parquet(tmp_path / "pq", labels="str" if case == "wnid_labels" else "int",
                        hf=case == "hf_names_only")
    names = None
    if case == "keras_names":
        names = root / "imagenet_class_index.json"
        names.write_text(json.dumps({str(i): [w, NAMES[w].replace(" ", "_")]
                                     for i, w in enumerate(WNIDS)}))
    elif case == "wnid_labels":
        names = root / "classes.csv"
        names.write_text("wnid,name\n" + "".join(f"{w},{n}\n" for w, n in NAMES.items()))
    train, val = D.open_dataset(root, "parquet", names, None).load()
    assert train.wnids == WNIDS[:3] == val.wnids
    expected = WNIDS[:3] if case == "hf_names_only" else [NAMES[w] for w in WNIDS[:3]]
    assert train.names == expected


def test_parquet_refusals(tmp_path: Path) -> None:
    root = make_parquet(tmp_path / "pq", hf=False)
    with pytest.raises(D.DataError) as e:  # int labels and no names anywhere
        D.open_dataset(root, "parquet", None, None).load()
    assert "label 0 in" in one_line(e) and "train-00000-of-00002.parquet" in one_line(e)
    (root / "validation" / "part-0.parquet").unlink()
    (root / "validation").rmdir()
    (root / "classes.json").write_text(json.dumps(NAMES))
    with pytest.raises(D.DataError) as e:
        D.check_dataset(spec(root, format="parquet", class_names="classes.json"))
    assert str(root / "val") in one_line(e) and "missing split" in one_line(e)
    pq.write_table(pa.table({"label": [0]}), root / "val.parquet")
    with pytest.raises(D.DataError) as e:
        D.open_dataset(root, "parquet", root / "classes.json", None).load()
    assert "no 'image' column" in one_line(e)
    (root / "val.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(D.DataError) as e:
        D.open_dataset(root, "parquet", root / "classes.json", None).load()
    assert f"{root / 'val.parquet'}: cannot read Parquet" in one_line(e)


def test_parquet_bad_image_bytes_skipped(tmp_path: Path) -> None:
    root = tmp_path / "pq"
    good = jpeg_bytes((1, 2, 3))
    rows = [(good, "a.jpg", "n1", "c"), (good[:40], "b.jpg", "n1", "c"), (None, None, "n1", "c")]
    write_export(root / "train.parquet", rows)
    write_export(root / "val.parquet", rows)
    dataset = D.open_dataset(root, "parquet", None, None)
    train, _ = dataset.load()
    ds = D.ImageTextDataset(train.samples, train.names, TF, ["{}"], "templates", 0,
                            reader=dataset.reader())
    b = D.Collate(FakeTokenizer(), 8)(ds.__getitems__([0, 1, 2]))
    assert b["size"] == 1 and b["skipped"] == 2


# --------------------------------------------------------------------------- preprocessing


def _processors():
    import transformers as T

    clip = getattr(T, "CLIPImageProcessorPil", None) or T.CLIPImageProcessor
    siglip = getattr(T, "SiglipImageProcessorPil", None) or T.SiglipImageProcessor
    return [
        clip(size={"shortest_edge": 32}, crop_size={"height": 24, "width": 24}),
        clip(size={"shortest_edge": 20}, crop_size={"height": 28, "width": 26}),  # pads
        clip(),
        siglip(size={"height": 24, "width": 24}),
        siglip(),
    ]


@pytest.mark.parametrize("proc", _processors(), ids=["clip32", "clip_pad", "clip224",
                                                      "siglip24", "siglip224"])
def test_transform_matches_hf_processors(proc) -> None:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
              for h, w in ((37, 61), (61, 37), (50, 50), (13, 29), (255, 333))]
    rgba = rng.integers(0, 255, (40, 30, 4), dtype=np.uint8)
    images += [Image.fromarray(rgba, "RGBA"), images[0].convert("L"), images[1].convert("P")]
    tf = D.ImageTransform.from_processor(proc)
    for img in images:
        ours = tf(img)
        theirs = proc(images=img, return_tensors="pt")["pixel_values"][0]
        assert ours.shape == theirs.shape, (img.size, img.mode)
        assert torch.allclose(ours, theirs, atol=1e-5), (img.size, img.mode)


def test_transform_fields_from_processor() -> None:
    clip, _, _, siglip, _ = _processors()
    t = D.ImageTransform.from_processor(clip)
    assert (t.shortest_edge, t.crop, t.output_size) == (32, (24, 24), (24, 24))
    assert t.resize_size(61, 37) == (52, 32)  # 32 * 61 / 37 = 52.8, truncated like HF
    s = D.ImageTransform.from_processor(siglip)
    assert (s.shortest_edge, s.crop, s.output_size) == (None, None, (24, 24))
    fake = SimpleNamespace(size={"height": 8, "width": 8}, image_mean=0.5, image_std=0.5,
                           resample=2, do_normalize=True)
    assert D.ImageTransform.from_processor(fake).mean == (0.5, 0.5, 0.5)


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_folder_sweep_end_to_end(tmp_path: Path, cache_dir: Path) -> None:
    """One trial through the CLI and Ray on JPEG folders with captions, a corrupt JPEG in
    train and one in val: the trial terminates and counts them."""
    root = make_folder(tmp_path / "imagenet", wnids=WNIDS[:4], n_train=5, n_val=3)
    bad = root / "train" / WNIDS[0] / f"{WNIDS[0]}_train0.JPEG"  # has captions: trained on
    bad.write_bytes(bad.read_bytes()[:30])
    (root / "val" / WNIDS[1] / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 nope")
    doc = base_doc(tmp_path)
    doc["model"] = {"pretrained": "tiny", "tiny": dict(TINY)}
    doc["data"] = {"root": str(root), "class_names": "classes.json",
                   "captions": "captions.jsonl", "templates": ["a photo of a {}."]}
    doc["grid"] = {"variant": ["siglip"], "text_source": ["captions"], "batch_size": [8],
                   "n_train_classes": [4], "seed": [0]}
    p = tmp_path / "real.yaml"
    p.write_text(yaml.safe_dump(doc))
    r = subprocess.run([sys.executable, "-m", "sweeper.run", str(p), "--cache-dir",
                        str(cache_dir)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trial = next((tmp_path / "results" / "t" / "trials").iterdir())
    status = json.loads((trial / "status.json").read_text())
    assert status["status"] == "terminated"
    assert sorted(status["train_classes"]) == WNIDS[:4]
    assert status["left_out_no_caption"] == 4 and status["n_train_images"] == 16
    assert status["skipped_images"] == 1  # 16 captioned images, 2 full batches: seen once
    history = [json.loads(x) for x in (trial / "history.jsonl").read_text().splitlines()]
    assert history[-1]["skipped_images"] == 2  # plus the broken val image
    assert history[-1]["val_top1_seen"] is not None
    assert "skipping unreadable image" in r.stdout + r.stderr
