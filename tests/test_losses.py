"""Tests for sweeper.losses: HF parity, a plain B x B reference, and gloo multi-process runs.

The multi-process tests spawn one group of 2 and one group of 3 CPU processes (gloo);
each process evaluates every (loss, pair_targets) case once and saves its share and
gradients, and the parent compares them against the single-process reference on the
concatenated batch.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

try:
    import sweeper.losses  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweeper.losses import _SigmoidBlockNLL, sigmoid_loss, softmax_loss

MODES = ("negative", "positive", "ignore")
LOCAL_BATCH = 4
DIM = 6
LOGIT_SCALE = math.log(10.0)
LOGIT_BIAS = -2.0


# --------------------------------------------------------------------------------------
# plain single-process references: the whole B x B matrix, written for readability
# --------------------------------------------------------------------------------------


def reference_sigmoid(
    img: torch.Tensor,
    txt: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    mode: str,
    labels: torch.Tensor,
) -> torch.Tensor:
    n = img.shape[0]
    logits = img @ txt.T * logit_scale.exp() + logit_bias
    eye = torch.eye(n, dtype=torch.bool)
    same = labels[:, None] == labels[None, :]
    ones = torch.ones(n, n, dtype=img.dtype)
    if mode == "negative":
        z, w = torch.where(eye, 1.0, -1.0), ones
    elif mode == "positive":
        z, w = torch.where(same, 1.0, -1.0), ones
    else:  # ignore: drop same-class off-diagonal pairs, still divide by B
        z, w = torch.where(eye, 1.0, -1.0), (~same | eye).to(img.dtype)
    return -(w * F.logsigmoid(z.to(img.dtype) * logits)).sum() / n


def reference_softmax(
    img: torch.Tensor,
    txt: torch.Tensor,
    logit_scale: torch.Tensor,
    mode: str,
    labels: torch.Tensor,
) -> torch.Tensor:
    n = img.shape[0]
    logits = img @ txt.T * logit_scale.exp()

    def one_direction(lg: torch.Tensor) -> torch.Tensor:
        row_losses = []
        for i in range(n):
            row = lg[i]
            same = [j for j in range(n) if labels[j] == labels[i]]
            if mode == "negative":
                loss = torch.logsumexp(row, 0) - row[i]
            elif mode == "positive":  # uniform target over same-class columns
                loss = torch.logsumexp(row, 0) - row[same].mean()
            else:  # ignore: same-class columns other than i leave the denominator
                kept = [j for j in range(n) if j == i or j not in same]
                loss = torch.logsumexp(row[kept], 0) - row[i]
            row_losses.append(loss)
        return torch.stack(row_losses).mean()

    return (one_direction(logits) + one_direction(logits.T)) / 2


def make_inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised float64 embeddings and labels with classes repeated within and across ranks."""
    gen = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, DIM, generator=gen, dtype=torch.float64), dim=-1)
    # Correlate texts with their images so the positives matter.
    txt = F.normalize(img + 0.7 * torch.randn(n, DIM, generator=gen, dtype=torch.float64), dim=-1)
    labels = torch.arange(n) % 3
    return img, txt, labels


def scalar_params() -> tuple[torch.Tensor, torch.Tensor]:
    scale = torch.tensor([LOGIT_SCALE], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([LOGIT_BIAS], dtype=torch.float64, requires_grad=True)
    return scale, bias


def reference_loss_and_grads(
    loss_name: str, mode: str, img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    img = img.clone().requires_grad_()
    txt = txt.clone().requires_grad_()
    scale, bias = scalar_params()
    if loss_name == "sigmoid":
        loss = reference_sigmoid(img, txt, scale, bias, mode, labels)
        grads = torch.autograd.grad(loss, [img, txt, scale, bias])
    else:
        loss = reference_softmax(img, txt, scale, mode, labels)
        grads = (*torch.autograd.grad(loss, [img, txt, scale]), None)
    return dict(loss=loss.detach(), img=grads[0], txt=grads[1], scale=grads[2], bias=grads[3])


def run_loss(
    loss_name: str,
    mode: str,
    img: torch.Tensor,
    txt: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    if loss_name == "sigmoid":
        return sigmoid_loss(img, txt, scale, bias, pair_targets=mode, labels=labels)
    return softmax_loss(img, txt, scale, pair_targets=mode, labels=labels)


# --------------------------------------------------------------------------------------
# Hugging Face parity
# --------------------------------------------------------------------------------------

_TINY_TEXT = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=1,
    num_attention_heads=4,
    max_position_embeddings=16,
)
_TINY_VISION = dict(
    image_size=16,
    patch_size=8,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=1,
    num_attention_heads=4,
)


def _tiny_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(n, 3, 16, 16, generator=gen, dtype=torch.float64)
    input_ids = torch.randint(3, 100, (n, 7), generator=gen)
    return pixel_values, input_ids


def test_sigmoid_loss_matches_hf_siglip() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.SiglipConfig(text_config=_TINY_TEXT, vision_config=_TINY_VISION)
    model = transformers.SiglipModel(config).double().eval()
    pixel_values, input_ids = _tiny_batch(6)
    out = model(pixel_values=pixel_values, input_ids=input_ids, return_loss=True)

    ours = sigmoid_loss(out.image_embeds, out.text_embeds, model.logit_scale, model.logit_bias)
    assert ours.shape == ()
    torch.testing.assert_close(ours, out.loss, rtol=0, atol=1e-6)
    # Gradients, too (this exercises the hand-written backward of the block loss).
    wrt = [model.logit_scale, model.logit_bias, out.image_embeds, out.text_embeds]
    hf_grads = torch.autograd.grad(out.loss, wrt, retain_graph=True)
    our_grads = torch.autograd.grad(ours, wrt)
    for ours_g, hf_g in zip(our_grads, hf_grads, strict=True):
        torch.testing.assert_close(ours_g, hf_g, rtol=0, atol=1e-6)


def test_softmax_loss_matches_hf_clip() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=_TINY_TEXT, vision_config=_TINY_VISION, projection_dim=16
    )
    model = transformers.CLIPModel(config).double().eval()
    pixel_values, input_ids = _tiny_batch(6)
    out = model(pixel_values=pixel_values, input_ids=input_ids, return_loss=True)

    ours = softmax_loss(out.image_embeds, out.text_embeds, model.logit_scale)
    assert ours.shape == ()
    torch.testing.assert_close(ours, out.loss, rtol=0, atol=1e-6)
    wrt = [model.logit_scale, out.image_embeds, out.text_embeds]
    hf_grads = torch.autograd.grad(out.loss, wrt, retain_graph=True)
    our_grads = torch.autograd.grad(ours, wrt)
    for ours_g, hf_g in zip(our_grads, hf_grads, strict=True):
        torch.testing.assert_close(ours_g, hf_g, rtol=0, atol=1e-6)


def test_references_agree_with_hf_formulas_in_negative_mode() -> None:
    """The readable references reduce to the HF formulas when pair_targets='negative'."""
    img, txt, labels = make_inputs(7)
    scale, bias = scalar_params()
    logits_per_text = txt @ img.T * scale.exp() + bias
    signs = 2 * torch.eye(7, dtype=torch.float64) - 1
    hf_sigmoid = -F.logsigmoid(signs * logits_per_text).sum(-1).mean()
    torch.testing.assert_close(
        reference_sigmoid(img, txt, scale, bias, "negative", labels), hf_sigmoid
    )
    logits_per_text = txt @ img.T * scale.exp()
    target = torch.arange(7)
    hf_softmax = (
        F.cross_entropy(logits_per_text, target) + F.cross_entropy(logits_per_text.T, target)
    ) / 2
    torch.testing.assert_close(reference_softmax(img, txt, scale, "negative", labels), hf_softmax)


# --------------------------------------------------------------------------------------
# single process against the reference, every pair_targets mode
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_name", ["sigmoid", "softmax"])
@pytest.mark.parametrize("mode", MODES)
def test_single_process_matches_reference(loss_name: str, mode: str) -> None:
    img, txt, labels = make_inputs(9)
    ref = reference_loss_and_grads(loss_name, mode, img, txt, labels)

    x_img, x_txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    scale, bias = scalar_params()
    loss = run_loss(loss_name, mode, x_img, x_txt, scale, bias, labels)
    loss.backward()

    torch.testing.assert_close(loss.detach(), ref["loss"], rtol=0, atol=1e-10)
    torch.testing.assert_close(x_img.grad, ref["img"], rtol=0, atol=1e-10)
    torch.testing.assert_close(x_txt.grad, ref["txt"], rtol=0, atol=1e-10)
    torch.testing.assert_close(scale.grad, ref["scale"], rtol=0, atol=1e-10)
    if loss_name == "sigmoid":
        torch.testing.assert_close(bias.grad, ref["bias"], rtol=0, atol=1e-10)


@pytest.mark.parametrize("loss_name", ["sigmoid", "softmax"])
def test_pair_target_modes_differ_with_repeated_classes(loss_name: str) -> None:
    img, txt, labels = make_inputs(9)
    scale, bias = scalar_params()
    values = {m: run_loss(loss_name, m, img, txt, scale, bias, labels).item() for m in MODES}
    assert len({round(v, 8) for v in values.values()}) == 3, values
    # None means "negative", and labels don't change the "negative" loss.
    none_value = run_loss(loss_name, None, img, txt, scale, bias, None).item()  # type: ignore[arg-type]
    assert none_value == pytest.approx(values["negative"], abs=1e-12)


def test_pair_targets_are_irrelevant_without_repeated_classes() -> None:
    img, txt, _ = make_inputs(5)
    labels = torch.arange(5)
    scale, bias = scalar_params()
    for loss_name in ("sigmoid", "softmax"):
        values = [run_loss(loss_name, m, img, txt, scale, bias, labels).item() for m in MODES]
        assert values == pytest.approx([values[0]] * 3, abs=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("diagonal", [True, False])
def test_sigmoid_block_backward_gradcheck(mode: str, diagonal: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    img = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
    img_labels, txt_labels = torch.tensor([0, 1, 0, 2]), torch.tensor([1, 1, 0, 2])

    def block(i: torch.Tensor, t: torch.Tensor, s: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _SigmoidBlockNLL.apply(i, t, s, b, img_labels, txt_labels, diagonal, mode)

    assert torch.autograd.gradcheck(block, (img, txt, scale, bias))


@pytest.mark.parametrize("loss_name", ["sigmoid", "softmax"])
def test_invalid_arguments(loss_name: str) -> None:
    img, txt, labels = make_inputs(4)
    scale, bias = scalar_params()
    with pytest.raises(ValueError, match="needs labels"):
        run_loss(loss_name, "positive", img, txt, scale, bias, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs labels"):
        run_loss(loss_name, "ignore", img, txt, scale, bias, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pair_targets must be one of"):
        run_loss(loss_name, "neutral", img, txt, scale, bias, labels)
    with pytest.raises(ValueError, match="labels must have shape"):
        run_loss(loss_name, "positive", img, txt, scale, bias, labels[:3])
    with pytest.raises(ValueError, match="integer class ids"):
        run_loss(loss_name, "positive", img, txt, scale, bias, labels.double())
    with pytest.raises(ValueError, match=r"\[b, d\]"):
        run_loss(loss_name, "negative", img, txt[:3], scale, bias, labels)


# --------------------------------------------------------------------------------------
# several processes (gloo)
# --------------------------------------------------------------------------------------


def _dist_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """Runs in a spawned process: every (loss, mode) case, results saved for the parent."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        img, txt, labels = make_inputs(world_size * LOCAL_BATCH)
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        results = {}
        for loss_name in ("sigmoid", "softmax"):
            for mode in MODES:
                x_img = img[rows].clone().requires_grad_()
                x_txt = txt[rows].clone().requires_grad_()
                scale, bias = scalar_params()
                saved_numels: list[int] = []

                def pack(t: torch.Tensor, numels: list[int] = saved_numels) -> torch.Tensor:
                    numels.append(t.numel())
                    return t

                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    share = run_loss(loss_name, mode, x_img, x_txt, scale, bias, labels[rows])
                share.backward()
                results[(loss_name, mode)] = dict(
                    share=share.detach(),
                    img=x_img.grad,
                    txt=x_txt.grad,
                    scale=scale.grad,
                    bias=bias.grad,
                    max_saved_numel=max(saved_numels),
                )
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        # Nobody tears gloo down while a peer may still be talking to it.
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [2, 3])
def test_distributed_matches_single_process(world_size: int, tmp_path: Path) -> None:
    mp.spawn(
        _dist_worker,
        args=(world_size, str(tmp_path / "init"), str(tmp_path)),
        nprocs=world_size,
        join=True,
    )
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    img, txt, labels = make_inputs(world_size * LOCAL_BATCH)
    global_batch = world_size * LOCAL_BATCH

    for loss_name in ("sigmoid", "softmax"):
        for mode in MODES:
            case = f"{loss_name}/{mode}/W={world_size}"
            ref = reference_loss_and_grads(loss_name, mode, img, txt, labels)
            got = [results[(loss_name, mode)] for results in per_rank]
            shares = torch.stack([g["share"] for g in got])
            # The mean over ranks is the global loss; each share alone is not.
            torch.testing.assert_close(shares.mean(), ref["loss"], rtol=0, atol=1e-9, msg=case)
            assert not torch.allclose(shares, ref["loss"].expand_as(shares)), case

            # Shared parameters: DDP averages the ranks' gradients.
            mean_scale_grad = torch.stack([g["scale"] for g in got]).mean(0)
            torch.testing.assert_close(mean_scale_grad, ref["scale"], rtol=0, atol=1e-9, msg=case)
            if loss_name == "sigmoid":
                mean_bias_grad = torch.stack([g["bias"] for g in got]).mean(0)
                torch.testing.assert_close(mean_bias_grad, ref["bias"], rtol=0, atol=1e-9, msg=case)

            # Embeddings are per-rank activations: the owning rank receives
            # sum_s d share_s / d x_r = W * dL/dx_r, so its gradient / W is the
            # single-process gradient of the slice (and the encoder's parameter
            # gradients, once DDP divides by W, are the single-process ones).
            for r, g in enumerate(got):
                rows = slice(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH)
                for key in ("img", "txt"):
                    torch.testing.assert_close(
                        g[key] / world_size, ref[key][rows], rtol=0, atol=1e-9, msg=f"{case} {key}"
                    )

            # The ring never keeps a b x B block for backward; the all-gather loss does.
            max_saved = max(g["max_saved_numel"] for g in got)
            if loss_name == "sigmoid":
                assert max_saved <= max(LOCAL_BATCH * DIM, LOCAL_BATCH * LOCAL_BATCH), case
            else:
                assert max_saved >= LOCAL_BATCH * global_batch, case
