"""Training preprocesses exactly as the pinned `AutoProcessor` does, torchvision installed or
not (issue 15, item 8).

transformers 5 picks the torchvision image-processor backend whenever torchvision is
installed, and PIL otherwise; `sweeper.models.load_pretrained` pins the PIL one, which
`data.ImageTransform` reproduces. For a SigLIP-B/16-like processor (224 x 224, bicubic,
mean/std 0.5) and a CLIP-like one (shortest edge 224, centre crop, OpenAI mean/std), on
images of several sizes and modes (RGB JPEG, RGBA and palette PNGs with transparency,
greyscale, smaller than the crop):

* `parity_backend_pinned`: the backend `load_pretrained` gives (`pil` expected);
  `parity_backend_default`: what a plain `AutoProcessor.from_pretrained` gives here
  (`torchvision` where it is installed: what the pin protects against);
* `parity_max_abs_diff_<arch>`: ours vs the pinned processor (<= 1e-5: float rounding);
* `parity_final_model_max_abs_diff_<arch>`: ours vs `AutoProcessor.from_pretrained(
  final_model, backend="pil")` of a model saved by `checkpoint.save_final_model`;
* `parity_torchvision_max_abs_diff_<arch>` / `_mean_`: ours vs the torchvision backend,
  where torchvision is installed (what an unpinned load would have fed the model).

Exits 1 if a pinned comparison differs. Run: `python bench/processor_parity.py`.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

TOL = 1e-5


def images() -> list[Any]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)

    def noise(w: int, h: int, c: int = 3) -> np.ndarray:
        coarse = rng.integers(0, 256, (max(2, h // 24), max(2, w // 24), c), dtype=np.uint8)
        mode = {3: "RGB", 4: "RGBA", 1: "L"}[c]
        big = Image.fromarray(coarse.squeeze(), mode).resize((w, h), Image.BICUBIC)
        return np.asarray(big)

    out = []
    buf = io.BytesIO()
    Image.fromarray(noise(500, 375)).save(buf, "JPEG", quality=90)
    out.append(Image.open(io.BytesIO(buf.getvalue())))
    out.append(Image.fromarray(noise(224, 224)))
    out.append(Image.fromarray(noise(100, 300)))
    out.append(Image.fromarray(noise(320, 240, 4), "RGBA"))
    out.append(Image.fromarray(noise(256, 256, 1), "L"))
    pal = Image.fromarray(noise(200, 150)).convert("P", palette=Image.ADAPTIVE)
    pal.info["transparency"] = 0
    out.append(pal)
    return out


def model_dir(arch: str, root: Path) -> Path:
    from sweeper.models import build_tiny, build_tiny_clip
    from sweeper.spec import TinyModelSpec
    from sweeper.synthetic import vocabulary

    tiny = TinyModelSpec(hidden_size=8, num_heads=1, num_layers=1, image_size=224,
                         patch_size=16, max_length=16)
    model, processor = (build_tiny if arch == "siglip" else build_tiny_clip)(
        tiny, vocabulary())
    d = root / arch
    model.save_pretrained(d)
    processor.save_pretrained(d)
    return d


def diffs(transform: Any, image_processor: Any, imgs: list[Any]) -> tuple[float, float]:
    """(max, mean) absolute difference of ours vs `image_processor` over `imgs`."""
    import torch

    worst, total, n = 0.0, 0.0, 0
    for im in imgs:
        ours = transform(im.copy())
        theirs = image_processor(images=im.copy(), return_tensors="pt")["pixel_values"][0]
        d = (ours - theirs.to(torch.float32)).abs()
        worst, total, n = max(worst, d.max().item()), total + d.sum().item(), n + d.numel()
    return worst, total / n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="(no effect: it is quick)")
    ap.parse_args(argv)
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    from sweeper import data as D
    from sweeper.checkpoint import save_final_model
    from sweeper.models import IMAGE_BACKEND, is_pil_backend, load_pretrained

    imgs, ok = images(), True
    common.emit("parity_torchvision_installed", is_torchvision_available())
    with tempfile.TemporaryDirectory(prefix="parity-") as work:
        for arch in ("siglip", "clip"):
            d = model_dir(arch, Path(work))
            model, processor = load_pretrained(d)
            ip = processor.image_processor
            default = AutoProcessor.from_pretrained(d).image_processor
            if arch == "siglip":
                common.emit("parity_backend_pinned", "pil" if is_pil_backend(ip) else
                            type(ip).__name__)
                common.emit("parity_backend_default", "pil" if is_pil_backend(default)
                            else "torchvision")
            ok &= is_pil_backend(ip)
            tf = D.ImageTransform.from_processor(ip)
            worst, _ = diffs(tf, ip, imgs)
            common.emit(f"parity_max_abs_diff_{arch}", worst)
            ok &= worst <= TOL
            out = Path(work) / f"final-{arch}"
            save_final_model(out, model, processor)
            saved = AutoProcessor.from_pretrained(out, backend=IMAGE_BACKEND).image_processor
            worst, _ = diffs(tf, saved, imgs)
            common.emit(f"parity_final_model_max_abs_diff_{arch}", worst)
            ok &= worst <= TOL
            if not is_pil_backend(default):
                worst, mean = diffs(tf, default, imgs)
                common.emit(f"parity_torchvision_max_abs_diff_{arch}", worst)
                common.emit(f"parity_torchvision_mean_abs_diff_{arch}", mean)
    common.emit("parity_ok", ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
