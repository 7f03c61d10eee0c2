"""Contrastive image-text losses that can be split across data-parallel workers.

Two losses are provided:

* :func:`sigmoid_loss` -- SigLIP's pairwise sigmoid loss. With several workers the
  text embeddings travel around a ring of workers (``world_size - 1`` point-to-point
  exchanges), so each step only holds a ``b x b`` block of logits, never ``b x B``.
* :func:`softmax_loss` -- CLIP's symmetric cross-entropy (InfoNCE). Embeddings are
  all-gathered with gradients and each worker computes its own ``b x B`` rows for both
  directions.

Notation: ``b`` is this worker's batch size, ``W`` the number of workers in the
process group and ``B = W * b`` the global batch size. Every worker must pass the
same ``b`` (the exchanged buffers are allocated with the local shape).

Scaling contract (both losses)
------------------------------
The global loss ``L`` is a sum over the global batch divided by ``B``; it splits as
``L = sum_r L_r`` where ``L_r`` collects the terms whose *row* (image for the
sigmoid loss; image rows and text rows for the softmax loss) lives on rank ``r``.
Each worker returns its **share** ``W * L_r``, hence

* ``mean_r(share_r) == L``: logging the mean over ranks reports the global loss;
* DDP averages parameter gradients, ``(1/W) * sum_r d share_r / d theta
  = sum_r d L_r / d theta = d L / d theta``: the averaged gradients equal those of a
  single process that sees the whole global batch;
* for activations: the gradient that arrives at rank ``r``'s embeddings (through the
  autograd-aware communication) is ``sum_s d share_s / d x_r = W * dL/dx_r``, i.e.
  the owning rank's embedding gradient divided by ``W`` equals the single-process
  gradient of ``L`` with respect to that slice.

With one process (``W = 1``) the share *is* the loss, and the results equal
Hugging Face's ``SiglipModel`` / ``CLIPModel`` losses.

Label-aware pair targets
------------------------
``pair_targets`` decides what happens to off-diagonal pairs whose samples share a
class id (``labels``):

* ``"negative"`` (default, paper behaviour): only the matching image-text pair is
  positive; ``labels`` are not needed (and ignored if given).
* ``"positive"``: same-class pairs are positives. Sigmoid: label ``+1``. Softmax: the
  target distribution of a row is uniform over its same-class columns (which always
  include the matching pair), i.e. cross-entropy against soft targets.
* ``"ignore"``: same-class off-diagonal pairs are dropped. Sigmoid: they contribute
  nothing to the sum. Softmax: their logits are removed from the row's softmax
  denominator (masked to ``-inf``), the target stays the matching pair.

Normalisation is the same in every mode: the sigmoid loss is always divided by the
global batch size ``B`` (not by the number of pairs kept), the softmax loss is always
the mean over the ``B`` rows of each direction, averaged over the two directions.
Dividing by a fixed ``B`` keeps the rank shares independent (no extra collective to
count the kept pairs) and makes the loss scale of ``"ignore"`` comparable to
``"negative"``'s.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

PairTargets = Literal["negative", "positive", "ignore"]
_PAIR_TARGETS = ("negative", "positive", "ignore")

__all__ = ["PairTargets", "sigmoid_loss", "softmax_loss"]


# --------------------------------------------------------------------------------------
# argument handling
# --------------------------------------------------------------------------------------


def _resolve_group(group: dist.ProcessGroup | None) -> tuple[dist.ProcessGroup | None, int, int]:
    """Return ``(group, rank_in_group, world_size)``; ``(None, 0, 1)`` for one process."""
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None, 0, 1
        group = dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given process group")
    return group, rank, dist.get_world_size(group)


def _check_inputs(
    image_embeds: Tensor,
    text_embeds: Tensor,
    logit_scale: Tensor,
    pair_targets: PairTargets | None,
    labels: Tensor | None,
) -> tuple[str, Tensor | None]:
    """Validate shapes and ``pair_targets``; return the mode and the labels to use."""
    if image_embeds.dim() != 2 or image_embeds.shape != text_embeds.shape:
        raise ValueError(
            "image_embeds and text_embeds must both be [b, d]; got "
            f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
        )
    if logit_scale.numel() != 1:
        raise ValueError(f"logit_scale must hold one value, got shape {tuple(logit_scale.shape)}")
    mode = "negative" if pair_targets is None else pair_targets
    if mode not in _PAIR_TARGETS:
        raise ValueError(f"pair_targets must be one of {_PAIR_TARGETS} or None, got {mode!r}")
    if mode == "negative":
        # Labels cannot change the result; skip communicating them.
        return mode, None
    if labels is None:
        raise ValueError(f"pair_targets={mode!r} needs labels (class ids, shape [b])")
    if labels.shape != (image_embeds.shape[0],):
        raise ValueError(
            f"labels must have shape [b] = [{image_embeds.shape[0]}], got {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must hold integer class ids, got dtype {labels.dtype}")
    return mode, labels.to(device=image_embeds.device).contiguous()


# --------------------------------------------------------------------------------------
# sigmoid loss: one b x b block
# --------------------------------------------------------------------------------------


def _apply_signs_(
    x: Tensor,
    mode: str,
    row_labels: Tensor | None,
    col_labels: Tensor | None,
    diagonal: bool,
) -> Tensor:
    """Multiply a ``rows x cols`` block in place by its pair signs (+1 positive, -1 negative).

    ``diagonal`` says whether the block pairs a worker's images with its *own* texts,
    so that element ``(i, i)`` is the matching pair. Works in place because the block
    is the largest tensor of a ring step; returns ``x``.
    """
    if mode == "positive":
        assert row_labels is not None and col_labels is not None
        # A sample always shares its own class, so the matching pair is positive too.
        same = row_labels[:, None] == col_labels[None, :]
        return x.mul_(same.to(x.dtype).mul_(2.0).sub_(1.0))
    # "negative" and "ignore": only the matching pair is positive.
    x.neg_()
    if diagonal:
        x.diagonal().neg_()
    return x


def _pair_weights(
    mode: str,
    row_labels: Tensor | None,
    col_labels: Tensor | None,
    diagonal: bool,
    like: Tensor,
) -> Tensor | None:
    """0/1 weights of a block's pairs; ``None`` when every pair counts."""
    if mode != "ignore":
        return None
    assert row_labels is not None and col_labels is not None
    # Drop same-class pairs, but never the matching pair itself.
    weight = (row_labels[:, None] != col_labels[None, :]).to(like.dtype)
    if diagonal:
        weight.diagonal().fill_(1.0)
    return weight


def _block_logits(img: Tensor, txt: Tensor, logit_scale: Tensor, logit_bias: Tensor) -> Tensor:
    """``exp(logit_scale) * img @ txt.T + logit_bias`` in the promoted dtype, as HF does."""
    sim = img @ txt.T
    dtype = torch.promote_types(torch.promote_types(sim.dtype, logit_scale.dtype), logit_bias.dtype)
    return sim.to(dtype) * logit_scale.exp() + logit_bias


class _SigmoidBlockNLL(torch.autograd.Function):
    """Sum over a ``b x b`` block of ``-w * log sigmoid(sign * (scale * img @ txt.T + bias))``.

    Autograd would save several ``b x b`` tensors per block, and with one block per
    ring step those would add up to ``b x B`` again. This Function saves only its
    ``b x d`` inputs and recomputes the block's logits in backward, so the logits of
    at most one block are alive at any time; ``b x b`` temporaries are updated in
    place where that is free.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        img: Tensor,
        txt: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor,
        img_labels: Tensor | None,
        txt_labels: Tensor | None,
        diagonal: bool,
        mode: str,
    ) -> Tensor:
        signed = _apply_signs_(
            _block_logits(img, txt, logit_scale, logit_bias), mode, img_labels, txt_labels, diagonal
        )
        loglik = F.logsigmoid(signed)
        del signed
        weight = _pair_weights(mode, img_labels, txt_labels, diagonal, loglik)
        if weight is not None:
            loglik.mul_(weight)
        ctx.save_for_backward(img, txt, logit_scale, logit_bias, img_labels, txt_labels)
        ctx.diagonal = diagonal  # type: ignore[attr-defined]
        ctx.mode = mode  # type: ignore[attr-defined]
        return -loglik.sum()

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor
    ) -> tuple[Tensor | None, ...]:
        img, txt, logit_scale, logit_bias, img_labels, txt_labels = ctx.saved_tensors  # type: ignore[attr-defined]
        mode: str = ctx.mode  # type: ignore[attr-defined]
        diagonal: bool = ctx.diagonal  # type: ignore[attr-defined]
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        scale = logit_scale.exp()

        # With u = sign * logits: d/d logits [-log sigmoid(u)] = -sign * sigmoid(-u).
        g = _apply_signs_(
            _block_logits(img, txt, logit_scale, logit_bias), mode, img_labels, txt_labels, diagonal
        )
        g = _apply_signs_(g.neg_().sigmoid_(), mode, img_labels, txt_labels, diagonal).neg_()
        weight = _pair_weights(mode, img_labels, txt_labels, diagonal, g)
        if weight is not None:
            g.mul_(weight)
            del weight
        g.mul_(grad_out)  # g = d loss / d logits

        # d logits / d logit_bias = 1, d logits / d logit_scale = scale * img @ txt.T.
        grad_bias = g.sum().reshape(logit_bias.shape).to(logit_bias.dtype) if needs[3] else None
        grad_scale = None
        if needs[2]:
            sim = (img @ txt.T).to(g.dtype)
            grad_scale = (torch.dot(g.reshape(-1), sim.reshape(-1)) * scale).reshape(
                logit_scale.shape
            )
            grad_scale = grad_scale.to(logit_scale.dtype)
            del sim
        # d logits / d img = scale * txt (and symmetrically); scale the b x d results.
        g = g.to(img.dtype)
        grad_img = (g @ txt).mul_(scale.to(img.dtype)) if needs[0] else None
        grad_txt = (g.T @ img).mul_(scale.to(txt.dtype)) if needs[1] else None
        return grad_img, grad_txt, grad_scale, grad_bias, None, None, None, None


# --------------------------------------------------------------------------------------
# communication
# --------------------------------------------------------------------------------------


def _p2p_exchange(
    group: dist.ProcessGroup,
    to_rank: int,
    from_rank: int,
    tensors: list[Tensor],
) -> list[Tensor]:
    """Send each tensor to ``to_rank`` and receive same-shaped ones from ``from_rank``.

    Ranks are global ranks. ``batch_isend_irecv`` posts all sends and receives at once,
    so the ring cannot deadlock even when ``to_rank == from_rank`` (two workers).
    """
    received = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
    ops = []
    for send, recv in zip(tensors, received, strict=True):
        ops.append(dist.P2POp(dist.isend, send.contiguous(), to_rank, group))
        ops.append(dist.P2POp(dist.irecv, recv, from_rank, group))
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


class _NeighbourExchange(torch.autograd.Function):
    """Pass a tensor one step around the ring, with the gradient flowing back.

    Forward: send ``tensor`` to ``to_rank``, return what ``from_rank`` sent. Backward:
    the gradient of the received tensor belongs to ``from_rank`` (who owns it), so it
    is sent the opposite way, and the gradient of what we sent arrives from
    ``to_rank``. ``labels`` (class ids, no gradient) ride along in the same batch.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        group: dist.ProcessGroup,
        to_rank: int,
        from_rank: int,
        tensor: Tensor,
        labels: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        ctx.group = group  # type: ignore[attr-defined]
        ctx.to_rank = to_rank  # type: ignore[attr-defined]
        ctx.from_rank = from_rank  # type: ignore[attr-defined]
        if labels is None:
            (received,) = _p2p_exchange(group, to_rank, from_rank, [tensor])
            return received, None
        received, received_labels = _p2p_exchange(group, to_rank, from_rank, [tensor, labels])
        ctx.mark_non_differentiable(received_labels)
        return received, received_labels

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_received: Tensor, _grad_labels: object
    ) -> tuple[Tensor | None, ...]:
        (grad_sent,) = _p2p_exchange(
            ctx.group,  # type: ignore[attr-defined]
            ctx.from_rank,  # type: ignore[attr-defined]
            ctx.to_rank,  # type: ignore[attr-defined]
            [grad_received],
        )
        return None, None, None, grad_sent, None


# torch 2.13 renamed the single-tensor collectives (the old names warn); older torch
# (the project allows >= 2.4) only has the old ones.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_gather(tensor: Tensor, group: dist.ProcessGroup, world_size: int) -> Tensor:
    """Concatenate every rank's ``[b, ...]`` tensor along dim 0 (``[W * b, ...]``)."""
    tensor = tensor.contiguous()
    out = tensor.new_empty((world_size * tensor.shape[0], *tensor.shape[1:]))
    _all_gather_single(out, tensor, group=group)
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather whose backward hands each rank the gradient of its own slice.

    Every rank uses the gathered tensor in its own loss, so the gradient of rank
    ``r``'s slice is the sum over ranks of their gradients for that slice: a
    reduce-scatter (sum) of the ``[W * b, ...]`` gradients.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        tensor: Tensor,
        group: dist.ProcessGroup,
        world_size: int,
    ) -> Tensor:
        ctx.group = group  # type: ignore[attr-defined]
        ctx.world_size = world_size  # type: ignore[attr-defined]
        return _all_gather(tensor, group, world_size)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_gathered: Tensor
    ) -> tuple[Tensor | None, ...]:
        grad_gathered = grad_gathered.contiguous()
        world_size: int = ctx.world_size  # type: ignore[attr-defined]
        grad = grad_gathered.new_empty(
            (grad_gathered.shape[0] // world_size, *grad_gathered.shape[1:])
        )
        _reduce_scatter_single(grad, grad_gathered, group=ctx.group)  # type: ignore[attr-defined]
        return grad, None, None


# --------------------------------------------------------------------------------------
# public losses
# --------------------------------------------------------------------------------------


def sigmoid_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    pair_targets: PairTargets | None = "negative",
    labels: Tensor | None = None,
) -> Tensor:
    """SigLIP pairwise sigmoid loss; returns this worker's share (a 0-dim tensor).

    The global loss is ``-sum_{i,j} w_ij * log sigmoid(z_ij * (exp(logit_scale) *
    <img_i, txt_j> + logit_bias)) / B`` over all ``B x B`` image-text pairs of the
    global batch, with ``z_ij = +1`` for positive and ``-1`` for negative pairs and
    ``w_ij`` in {0, 1} (0 only for pairs dropped by ``pair_targets="ignore"``). With
    one process this is exactly Hugging Face ``SiglipModel``'s loss. Units: nats per
    sample of the global batch.

    With ``W > 1`` workers, each worker's texts (and class ids) travel around the ring
    in ``W - 1`` neighbour exchanges; the worker adds its images' ``b x b`` block
    against each visiting text block and returns ``W * (its blocks' sum) / B``. See the
    module docstring for why the mean over ranks is the global loss and DDP-averaged
    gradients are the single-process ones. The exchanges are collective: every worker
    of ``group`` must call this (and later backward) in step.

    Args:
        image_embeds: ``[b, d]`` L2-normalised image embeddings of this worker.
        text_embeds: ``[b, d]`` L2-normalised text embeddings, row ``i`` pairs with
            image ``i``.
        logit_scale: one-element log-temperature, as HF stores it (``exp`` is applied).
        logit_bias: one-element bias added to every logit.
        group: process group of the data-parallel workers; default: the world if
            ``torch.distributed`` is initialised, else a single process.
        pair_targets: ``"negative"`` (or ``None``), ``"positive"`` or ``"ignore"``; see
            the module docstring.
        labels: ``[b]`` integer class ids of this worker's samples; required unless
            ``pair_targets`` is ``"negative"``.

    Returns:
        0-dim tensor: this worker's share of the loss (equal to the loss when ``W = 1``).
    """
    mode, labels = _check_inputs(image_embeds, text_embeds, logit_scale, pair_targets, labels)
    group, rank, world_size = _resolve_group(group)
    global_batch = world_size * image_embeds.shape[0]

    total = _SigmoidBlockNLL.apply(
        image_embeds, text_embeds, logit_scale, logit_bias, labels, labels, True, mode
    )
    if world_size > 1:
        assert group is not None
        # Texts move to the right neighbour each step, so after k steps this worker
        # holds the texts of rank (rank - k) mod W; after W - 1 steps it has seen all.
        to_rank = dist.get_global_rank(group, (rank + 1) % world_size)
        from_rank = dist.get_global_rank(group, (rank - 1) % world_size)
        texts, text_labels = text_embeds, labels
        for _ in range(world_size - 1):
            texts, text_labels = _NeighbourExchange.apply(
                group, to_rank, from_rank, texts, text_labels
            )
            total = total + _SigmoidBlockNLL.apply(
                image_embeds, texts, logit_scale, logit_bias, labels, text_labels, False, mode
            )
    return total * (world_size / global_batch)


def _softmax_rows_nll(
    logits: Tensor,
    targets: Tensor,
    mode: str,
    row_labels: Tensor | None,
    col_labels: Tensor | None,
) -> Tensor:
    """Sum over rows of the cross-entropy of ``[rows, B]`` logits (see ``pair_targets``)."""
    if mode == "negative":
        return F.cross_entropy(logits, targets, reduction="sum")
    assert row_labels is not None and col_labels is not None
    same = row_labels[:, None] == col_labels[None, :]
    if mode == "positive":
        # Uniform target distribution over the same-class columns (>= 1: the match).
        soft = same.to(logits.dtype)
        soft = soft / soft.sum(dim=1, keepdim=True)
        return F.cross_entropy(logits, soft, reduction="sum")
    # "ignore": remove same-class columns other than the match from the denominator.
    same[torch.arange(logits.shape[0], device=logits.device), targets] = False
    return F.cross_entropy(logits.masked_fill(same, float("-inf")), targets, reduction="sum")


def softmax_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    logit_scale: Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    pair_targets: PairTargets | None = "negative",
    labels: Tensor | None = None,
) -> Tensor:
    """CLIP symmetric cross-entropy; returns this worker's share (a 0-dim tensor).

    The global loss is ``(CE(image -> text) + CE(text -> image)) / 2`` where each CE
    is the mean over the ``B`` rows of ``exp(logit_scale) * <x_i, y_j>`` logits against
    all ``B`` columns of the global batch. With one process this is exactly Hugging
    Face ``CLIPModel``'s loss. Units: nats per sample.

    With ``W > 1`` workers, image and text embeddings (and class ids) are all-gathered
    with gradients; the worker computes its ``b`` image rows and ``b`` text rows against
    the ``B`` gathered columns (two ``b x B`` logit matrices) and returns
    ``W * (sum of its rows' cross-entropies) / (2 * B)``. All workers of ``group``
    must call this (and later backward) in step.

    Args:
        image_embeds: ``[b, d]`` L2-normalised image embeddings of this worker.
        text_embeds: ``[b, d]`` L2-normalised text embeddings, row ``i`` pairs with
            image ``i``.
        logit_scale: one-element log-temperature, as HF stores it (``exp`` is applied).
        group: process group of the data-parallel workers; default: the world if
            ``torch.distributed`` is initialised, else a single process.
        pair_targets: ``"negative"`` (or ``None``), ``"positive"`` or ``"ignore"``; see
            the module docstring.
        labels: ``[b]`` integer class ids of this worker's samples; required unless
            ``pair_targets`` is ``"negative"``.

    Returns:
        0-dim tensor: this worker's share of the loss (equal to the loss when ``W = 1``).
    """
    mode, labels = _check_inputs(image_embeds, text_embeds, logit_scale, pair_targets, labels)
    group, rank, world_size = _resolve_group(group)
    local_batch = image_embeds.shape[0]

    if world_size > 1:
        assert group is not None
        all_images = _AllGatherWithGrad.apply(image_embeds, group, world_size)
        all_texts = _AllGatherWithGrad.apply(text_embeds, group, world_size)
        all_labels = None if labels is None else _all_gather(labels, group, world_size)
    else:
        all_images, all_texts, all_labels = image_embeds, text_embeds, labels
    global_batch = all_images.shape[0]

    scale = logit_scale.exp().reshape(())
    # Row i of this worker is column rank * b + i of the gathered matrices.
    targets = torch.arange(local_batch, device=image_embeds.device) + rank * local_batch
    logits_per_image = image_embeds @ all_texts.T * scale  # [b, B]
    logits_per_text = text_embeds @ all_images.T * scale  # [b, B]
    nll = _softmax_rows_nll(logits_per_image, targets, mode, labels, all_labels)
    nll = nll + _softmax_rows_nll(logits_per_text, targets, mode, labels, all_labels)
    return nll * (world_size / (2 * global_batch))
