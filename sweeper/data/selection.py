"""Per-trial selection: which classes a trial trains on, and which text pairs with a
sample each epoch."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

from sweeper.data.base import DataError, Sample

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- subsets & text


def choose_train_classes(wnids: Sequence[str], k: int, seed: int, order: str = "random",
                         explicit: Sequence[str] | None = None) -> list[str]:
    """The k training classes: the first k of an explicit list, the first k sorted, or a
    draw seeded by `seed` (the same on every rank and every rerun)."""
    if explicit:
        for i, w in enumerate(explicit):
            if w not in wnids:
                raise DataError(f"data.train_classes[{i}]: unknown class {w!r}")
        if len(set(explicit)) != len(explicit):
            raise DataError("data.train_classes: a class is listed twice")
        if k > len(explicit):
            raise DataError(f"n_train_classes: {k} exceeds the {len(explicit)} classes of "
                            "data.train_classes")
        return list(explicit)[:k]
    if k > len(wnids):
        raise DataError(f"n_train_classes: {k} exceeds the dataset's {len(wnids)} classes")
    if order == "sorted":
        return sorted(wnids)[:k]
    rng = random.Random(seed)
    return sorted(rng.sample(sorted(wnids), k))


def pick_text(sample: Sample, class_name: str, templates: Sequence[str], text_source: str,
              seed: int, epoch: int, index: int) -> str | None:
    """The text paired with a sample this epoch (deterministic in seed, epoch and index).

    `templates`: a template drawn per sample; `captions`: one of its captions (None when it
    has none: the sample is left out); `mixed`: a caption when it has one, else a template.
    """
    # Ints hash the same in every process and run (no PYTHONHASHSEED salt).
    rng = random.Random(hash((seed, epoch, index)) & 0xFFFFFFFF)
    if text_source in ("captions", "mixed") and sample.captions:
        return sample.captions[rng.randrange(len(sample.captions))]
    if text_source == "captions":
        return None
    return templates[rng.randrange(len(templates))].format(class_name)
