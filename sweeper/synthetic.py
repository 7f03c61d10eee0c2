"""A synthetic image-text dataset in the same ImageNet-style layout real data uses.

Classes are (colour, shape) pairs, drawn with noise, random position and size, so they are
learnable from pixels and compositional (a model that knows "red" and "circle" from other
classes can recognise "red circle" zero-shot). Captions are free text that mention the class
among distractor words (size, position, background), so `captions` and `templates` are
genuinely different text sources.

Layout written under `root`::

    train/<wnid>/<wnid>_<i>.png     val/<wnid>/<wnid>_<i>.png
    classes.json                    {wnid: "red circle", ...}
    captions.jsonl                  {"image": "train/<wnid>/<file>", "captions": [...]}

Generation is deterministic from the spec and cached: a finished folder carries a
`.complete` marker holding the spec it was built from, and is built in a temporary folder
and renamed into place, so concurrent trials never see half a dataset.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 220, 50),
    "purple": (150, 60, 200),
    "cyan": (60, 210, 220),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "bar", "star")

SIZES = ("small", "large", "tiny", "big")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "centre", "middle")
BACKGROUNDS = ("dark", "grey", "noisy", "speckled", "dim", "plain")
CAPTION_FORMS = (
    "a {size} {name} near the {pos} of a {bg} picture",
    "there is a {name} in the {pos} on a {bg} background",
    "{bg} image with a {size} {name} at the {pos}",
    "somebody drew a {name} , {size} , {pos} , {bg} backdrop",
)
# Words templates commonly use, so that user templates stay in the tiny tokenizer's vocab.
TEMPLATE_WORDS = (
    "a", "an", "the", "photo", "picture", "image", "drawing", "sketch", "rendering", "of",
    "this", "is", "that", "shows", "showing", "with", "it", "bright", "clean", "cropped",
    "close", "up", "low", "resolution", "good", "bad", "origami", "toy", "plastic",
)


def class_table(n_classes: int) -> list[tuple[str, str]]:
    """(wnid, name) of the first `n_classes` classes, in a fixed order that mixes colours and
    shapes early so that small datasets still share words across classes."""
    colours = list(COLOURS)
    out = []
    for i in range(len(colours) * len(SHAPES)):
        shape = SHAPES[i % len(SHAPES)]
        colour = colours[(i + i // len(SHAPES)) % len(colours)]
        out.append((f"n{i:08d}", f"{colour} {shape}"))
    if n_classes > len(out):
        raise ValueError(f"synthetic data has at most {len(out)} classes, asked {n_classes}")
    return out[:n_classes]


def vocabulary() -> list[str]:
    """Every word the synthetic captions and common templates use."""
    words: set[str] = set(COLOURS) | set(SHAPES) | set(TEMPLATE_WORDS)
    for group in (SIZES, POSITIONS, BACKGROUNDS, CAPTION_FORMS):
        for phrase in group:
            words.update(w for w in phrase.replace("{", " ").replace("}", " ").split())
    words.update({".", ",", "{}", "near", "in", "on", "at"})
    return sorted(w for w in words if w.isascii() and w not in {"size", "name", "pos", "bg"})


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int],
                colour: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    cx, cy, w = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
    elif shape == "cross":
        t = max(1, w // 5)
        draw.rectangle((cx - t, y0, cx + t, y1), fill=colour)
        draw.rectangle((x0, cy - t, x1, cy + t), fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(1, w // 6))
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)
    elif shape == "bar":
        draw.rectangle((x0, cy - w / 6, x1, cy + w / 6), fill=colour)
    elif shape == "star":
        pts = []
        for k in range(10):
            r = w / 2 if k % 2 == 0 else w / 5
            a = np.pi / 2 + k * np.pi / 5
            pts.append((cx + r * np.cos(a), cy - r * np.sin(a)))
        draw.polygon(pts, fill=colour)


def render(name: str, size: int, rng: np.random.Generator) -> tuple[Image.Image, dict[str, str]]:
    """One image of class `name` ("colour shape") and the nuisance factors used for captions."""
    colour_name, shape = name.split(" ", 1)
    bg_level = int(rng.integers(0, 90))
    base = rng.normal(bg_level, 18, size=(size, size, 3)).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(base, "RGB")
    draw = ImageDraw.Draw(img)
    frac = float(rng.uniform(0.35, 0.75))
    w = max(4, int(size * frac))
    x0 = int(rng.integers(0, size - w + 1))
    y0 = int(rng.integers(0, size - w + 1))
    jitter = rng.integers(-25, 26, size=3)
    colour = tuple(int(c) for c in np.clip(np.array(COLOURS[colour_name]) + jitter, 0, 255))
    _draw_shape(draw, shape, (x0, y0, x0 + w, y0 + w), colour)  # type: ignore[arg-type]
    arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, size=(size, size, 3))
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")
    col = "left" if x0 + w / 2 < size / 2 else "right"
    row = "top" if y0 + w / 2 < size / 2 else "bottom"
    factors = {
        "size": "large" if frac > 0.55 else "small",
        "pos": f"{row} {col}",
        "bg": "dark" if bg_level < 45 else "grey",
    }
    return img, factors


def captions_for(name: str, factors: dict[str, str], rng: np.random.Generator,
                 n: int = 2) -> list[str]:
    """`n` free-text captions of one image, each naming its class among distractors."""
    forms = rng.choice(len(CAPTION_FORMS), size=n, replace=False)
    return [CAPTION_FORMS[i].format(name=name, **factors) for i in forms]


def _spec_key(n_classes: int, train_per_class: int, val_per_class: int, image_size: int,
              seed: int, splits: tuple[str, ...]) -> dict[str, object]:
    return {
        "version": 1,
        "n_classes": n_classes,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "image_size": image_size,
        "seed": seed,
        "splits": list(splits),
    }


def generate(root: str | Path, n_classes: int = 20, train_per_class: int = 40,
             val_per_class: int = 20, image_size: int = 32, seed: int = 0,
             splits: tuple[str, ...] = ("train", "val")) -> Path:
    """Build the dataset under `root` (or reuse it if already built from the same spec)."""
    root = Path(root)
    key = _spec_key(n_classes, train_per_class, val_per_class, image_size, seed, splits)
    marker = root / ".complete"
    if marker.exists():
        try:
            if json.loads(marker.read_text()) == key:
                return root
        except ValueError:
            pass
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.tmp"))
    classes = class_table(n_classes)
    counts = {"train": train_per_class, "val": val_per_class}
    with open(tmp / "captions.jsonl", "w", encoding="utf-8") as manifest:
        for s_idx, split in enumerate(splits):
            for c_idx, (wnid, name) in enumerate(classes):
                # One generator per (split, class): adding classes never changes old images.
                rng = np.random.default_rng([seed, s_idx, c_idx])
                folder = tmp / split / wnid
                folder.mkdir(parents=True)
                for i in range(counts.get(split, train_per_class)):
                    img, factors = render(name, image_size, rng)
                    rel = f"{split}/{wnid}/{wnid}_{i:05d}.png"
                    img.save(tmp / rel)
                    caps = captions_for(name, factors, rng)
                    manifest.write(json.dumps({"image": rel, "captions": caps}) + "\n")
    (tmp / "classes.json").write_text(json.dumps(dict(classes), indent=1))
    (tmp / ".complete").write_text(json.dumps(key))
    if root.exists():
        # Another process may have finished the same build first; theirs is as good.
        if marker.exists() and json.loads(marker.read_text()) == key:
            shutil.rmtree(tmp, ignore_errors=True)
            return root
        shutil.rmtree(root)
    try:
        os.replace(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not marker.exists():
            raise
    return root


def default_cache_dir() -> Path:
    """Where generated datasets and the pretrained tiny model are cached."""
    env = os.environ.get("SWEEPER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sweeper"


def dataset_dir(n_classes: int, train_per_class: int, val_per_class: int, image_size: int,
                seed: int, cache_dir: str | Path | None = None) -> Path:
    """The cached folder for a synthetic spec, generated on first use."""
    base = Path(cache_dir) if cache_dir else default_cache_dir()
    name = f"synthetic-c{n_classes}-t{train_per_class}-v{val_per_class}-px{image_size}-s{seed}"
    return generate(base / "data" / name, n_classes, train_per_class, val_per_class,
                    image_size, seed)
