"""Image-text retrieval recall and mean per-class recall (`sweeper.evaluation`).

- a hand-computed 4-image, 8-caption example;
- against a brute-force implementation (full similarity matrix, ranks counted) on random
  embeddings with 0-3 captions per image, and in small chunks;
- at 2 gloo processes, each holding its shard of the images and their captions, the same
  figures as one process (the images and captions of every rank are gathered);
- mean per-class recall beside top-1 on unbalanced classes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sweeper import evaluation as E
from sweeper.evaluation import retrieval_metrics, zero_shot_metrics

KS = (1, 5, 10)
WORLD = 2

# Similarity of image i (rows) to caption j (columns); caption j belongs to image j // 2.
HAND = torch.tensor([
    [.90, .10, .80, .00, .20, .25, .10, .00],
    [.50, .20, .10, .05, .90, .30, .35, .40],
    [.00, .70, .15, .20, .60, .50, .30, .20],
    [.10, .00, .20, .30, .10, .20, .80, .90],
])


def test_recall_hand_computed() -> None:
    # With images as the unit vectors e_i and caption j as column j, image i . caption j is
    # HAND[i, j].
    img, txt = torch.eye(4), HAND.T.contiguous()
    m = retrieval_metrics(img, torch.arange(4), txt, torch.arange(8) // 2)
    # image -> text: image 0's best caption is its own c0; image 1's own captions (c2, c3)
    # come 7th and 8th; image 2's own c4 second (after c1); image 3's own c7 first.
    assert m["val_i2t_r1"] == 2 / 4
    assert m["val_i2t_r5"] == 3 / 4
    assert m["val_i2t_r10"] == 4 / 4
    # text -> image: c0, c5, c6 and c7 find their image first; c1 third, c2 fourth, c3
    # third, c4 second; with 4 images every caption's image is in its top 5.
    assert m["val_t2i_r1"] == 4 / 8
    assert m["val_t2i_r5"] == m["val_t2i_r10"] == 1.0


def brute_force(img: torch.Tensor, ids: torch.Tensor, txt: torch.Tensor, owner: torch.Tensor,
                k: int) -> tuple[float, float]:
    """(i2t, t2i) recall@k from the full similarity matrix: a query's rank is the number
    of candidates strictly more similar than its best own candidate."""
    sims = img @ txt.T
    i2t = []
    for i in range(len(ids)):
        best_own = sims[i, owner == ids[i]].max()
        i2t.append(int((sims[i] > best_own).sum()) < k)
    t2i = []
    for j in range(len(owner)):
        own = sims[ids == owner[j], j][0]
        t2i.append(int((sims[:, j] > own).sum()) < k)
    return sum(i2t) / len(i2t), sum(t2i) / len(t2i)


def random_set(seed: int, n: int = 23, d: int = 8) -> tuple[torch.Tensor, ...]:
    """`n` random images (ids 100, 103, ... so ids are not row numbers), 1-3 captions each
    close to their image (so recall is neither 0 nor 1), all normalised."""
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    ids = 100 + 3 * torch.arange(n)
    per = torch.randint(1, 4, (n,), generator=g)
    rows = torch.arange(n).repeat_interleave(per)
    txt = torch.nn.functional.normalize(img[rows] + 0.9 * torch.randn(len(rows), d, generator=g),
                                        dim=-1)
    return img, ids, txt, ids[rows]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_equals_brute_force(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    img, ids, txt, owner = random_set(seed)
    m = retrieval_metrics(img, ids, txt, owner)
    # Chunks of 7 queries score the same.
    monkeypatch.setattr(E, "RETRIEVAL_CHUNK", 7 * max(len(txt), len(img)))
    chunked = retrieval_metrics(img, ids, txt, owner)
    assert chunked == m
    for k in KS:
        i2t, t2i = brute_force(img, ids, txt, owner, k)
        assert m[f"val_i2t_r{k}"] == pytest.approx(i2t, abs=1e-12)
        assert m[f"val_t2i_r{k}"] == pytest.approx(t2i, abs=1e-12)
    values = [m[f"val_{d}_r{k}"] for d in ("i2t", "t2i") for k in KS]
    assert any(0 < v < 1 for v in values)  # the example is not degenerate


def test_no_captions_gives_none() -> None:
    m = retrieval_metrics(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long),
                          torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert set(m) == {f"val_{d}_r{k}" for d in ("i2t", "t2i") for k in KS}
    assert all(v is None for v in m.values())


def test_retrieval_captions_setting() -> None:
    from sweeper import data as D

    with_caps = [D.Sample("a", 0, ("x",)), D.Sample("b", 0)]
    bare = [D.Sample("a", 0), D.Sample("b", 0)]
    assert E.retrieval_captions("auto", with_caps) == [("x",), ()]
    assert E.retrieval_captions("auto", bare) is None
    assert E.retrieval_captions(False, with_caps) is None
    assert E.retrieval_captions(True, with_caps) == [("x",), ()]
    with pytest.raises(D.DataError, match=r"eval\.retrieval: true"):
        E.retrieval_captions(True, bare)


def test_mean_per_class_recall_hand_computed() -> None:
    # Class 0: 4 images, 2 right; class 1: 1 image, right; class 2: no image.
    cls = torch.eye(3)
    img = torch.eye(3)[[0, 0, 1, 2, 1]]
    labels = torch.tensor([0, 0, 0, 0, 1])
    m = zero_shot_metrics(img, labels, cls, [True, False, True], 1)
    assert m["val_top1"] == 3 / 5
    assert m["val_mean_per_class_recall"] == (2 / 4 + 1 / 1) / 2
    assert m["val_mean_per_class_recall_seen"] == 2 / 4  # class 2 has no image
    assert m["val_mean_per_class_recall_unseen"] == 1.0
    assert m["per_class"] == [0.5, 1.0, None]


# --------------------------------------------------------------------------- 2 processes


def _shard(data: tuple[torch.Tensor, ...], rank: int) -> tuple[torch.Tensor, ...]:
    """Rank `rank`'s images (every WORLD-th) and their captions."""
    img, ids, txt, owner = data
    mine = torch.arange(len(ids)) % WORLD == rank
    keep = torch.isin(owner, ids[mine])
    return img[mine], ids[mine], txt[keep], owner[keep]


def _cases() -> dict[str, tuple[torch.Tensor, ...]]:
    img, ids, txt, owner = random_set(5)
    # Images 0 and 2 with their captions, all on rank 0: rank 1 holds no captioned image.
    keep = torch.isin(owner, ids[[0, 2]])
    lone = (img[[0, 2]], ids[[0, 2]], txt[keep], owner[keep])
    return {"random": (img, ids, txt, owner), "rank-without-captions": lone}


def _zero_shot_case() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    cls = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2, 3, 3, 3])
    img = torch.nn.functional.normalize(cls[labels] + torch.randn(11, 8, generator=g), dim=-1)
    return img, labels, cls


def _dist_worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        results = {}
        for name, data in _cases().items():
            if name == "rank-without-captions":
                img, ids, txt, owner = data if rank == 0 else tuple(x[:0] for x in data)
            else:
                img, ids, txt, owner = _shard(data, rank)
            results[name] = retrieval_metrics(img, ids, txt, owner, WORLD)
        img, labels, cls = _zero_shot_case()
        mine = torch.arange(len(labels)) % WORLD == rank
        results["zero_shot"] = zero_shot_metrics(img[mine], labels[mine], cls,
                                                 [True, True, False, False, True], WORLD)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("retrieval-ddp")
    mp.spawn(_dist_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("case", ["random", "rank-without-captions"])
def test_two_process_recall_equals_one_process(case: str, two_process: list[dict]) -> None:
    want = retrieval_metrics(*_cases()[case])
    assert two_process[0][case] == two_process[1][case] == want
    assert all(v is not None for v in want.values())


def test_two_process_zero_shot_equals_one_process(two_process: list[dict]) -> None:
    img, labels, cls = _zero_shot_case()
    want = zero_shot_metrics(img, labels, cls, [True, True, False, False, True], 1)
    for got in two_process:
        assert set(got["zero_shot"]) == set(want)
        for k, v in want.items():
            assert got["zero_shot"][k] == pytest.approx(v), k
