"""Models by preset, hub id or directory; the two-tower wrapper the worker trains.

`load_pretrained(path)` loads a checkpoint directory through `AutoModel.from_pretrained` /
`AutoProcessor.from_pretrained`. `sweeper.prepare` resolves `model.pretrained` to such a
directory once, before trials launch: the presets are built by their family
(`Family.build`, here also `build_tiny`, `build_tiny_clip`, `build_tiny_siglip2`) and
pretrained once on synthetic data by `sweeper.pretrain`, cached by their config
`model.tiny`: `tiny` is a small SigLIP, `tiny-clip` a CLIP of the same shape (both with a
word-level tokenizer), `tiny-siglip2` a SigLIP 2 NaFlex with a Gemma-style BPE tokenizer.
What differs between the families is in `sweeper.families`; the presets' builders are in
`sweeper.presets`, the only other modules of sweeper imported here.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sweeper.families import (
    FAMILIES,
    IMAGE_KEYS,
    PRESETS,
    ModelError,
    family_of,
    family_of_model,
    prepare_tokenizer,
)
from sweeper.presets import gemma_style_bpe

# Defined with the families and presets; raised or used by the loaders here.
__all__ = ["PRESETS", "ModelError", "gemma_style_bpe"]

# The presets' builders, by the names the benchmarks and tests know them.
build_tiny = FAMILIES["siglip"].build
build_tiny_clip = FAMILIES["clip"].build
build_tiny_siglip2 = FAMILIES["siglip2"].build


def local_checkpoint(name: str) -> str:
    """`model.pretrained` that is not a preset, checked: an existing model directory
    (absolute), or a hub id as written. Presets are built by `sweeper.prepare`."""
    p = Path(name).expanduser()
    if p.exists() or name.startswith((".", "/", "~")):
        if not p.exists():
            raise ModelError(f"model.pretrained: directory {name!r} does not exist")
        if not (p / "config.json").is_file():
            raise ModelError(f"model.pretrained: {name!r} is not a model directory "
                             "(no config.json)")
        return str(p.resolve())
    return name


def _hub_error(name: str, e: BaseException) -> ModelError:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    if isinstance(e, LocalEntryNotFoundError):
        return ModelError(
            f"model.pretrained: {name!r} is not cached locally and the Hugging Face hub is "
            "unreachable (offline?); download it first or point to a directory")
    if isinstance(e, RepositoryNotFoundError | EntryNotFoundError):
        return ModelError(f"model.pretrained: {name!r} is not a model on the hub")
    # network errors come in many types
    return ModelError(f"model.pretrained: cannot fetch {name!r} from the hub "
                      f"({type(e).__name__})")


def check_loadable(model_spec: Any) -> Path | None:
    """Refuse, before any trial starts, a model that cannot be found (offline hub, typo):
    a directory without config.json, or a hub id whose config cannot be had. Returns a
    local folder holding the checkpoint's config and processor files (the directory, or
    the hub snapshot those files were fetched into), None for a preset."""
    name = model_spec.pretrained
    if name in PRESETS:
        return None
    path = local_checkpoint(name)
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import hf_hub_download

    try:
        config = Path(hf_hub_download(path, "config.json"))
    except Exception as e:
        raise _hub_error(name, e) from None
    for f in SMALL_FILES:  # what preflight reads besides config.json; absent ones are fine
        with contextlib.suppress(Exception):
            hf_hub_download(path, f)
    return config.parent


# The processor and tokenizer settings of a checkpoint, read before any weights are fetched.
SMALL_FILES = ("preprocessor_config.json", "processor_config.json", "tokenizer_config.json")
# What a checkpoint directory needs for `from_pretrained` of model and processor.
HUB_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken")


def hub_snapshot(name: str) -> str:
    """The local snapshot directory of hub model `name` (config, weights in safetensors,
    tokenizer and processor files), downloaded into the Hugging Face cache if absent."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, allow_patterns=list(HUB_PATTERNS))
    except Exception as e:
        raise _hub_error(name, e) from None


# The image-processor backend every load asks for. transformers 5 picks the torchvision one
# whenever torchvision is installed (most GPU clusters) and PIL otherwise; the two resize
# differently, and `data.ImageTransform` reproduces the PIL one exactly.
IMAGE_BACKEND = "pil"


def is_pil_backend(image_processor: Any) -> bool:
    """Whether an image processor resizes with PIL (not torchvision tensors)."""
    names = [c.__name__ for c in type(image_processor).__mro__]
    return "TorchvisionBackend" not in names and "BaseImageProcessorFast" not in names \
        and not type(image_processor).__name__.endswith("Fast")


def load_pretrained(path: str | Path, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(model, processor) of a checkpoint directory (or hub id) through
    `AutoModel`/`AutoProcessor.from_pretrained`.

    The weights are float32 whatever dtype the checkpoint was saved in (transformers 5 would
    keep a bf16 checkpoint in bf16, where updates of lr ~1e-5 vanish below its resolution):
    they are the optimizer's master copy, and bf16 comes only through autocast. The image
    processor is pinned to the PIL backend (`IMAGE_BACKEND`), so training preprocesses as
    `AutoProcessor.from_pretrained(path, backend="pil")` does, torchvision installed or not.
    """
    from transformers import AutoModel, AutoProcessor

    path = str(path)
    try:
        model = AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code,
                                          dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                  backend=IMAGE_BACKEND)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1)" if offline else " (hub unreachable or no such model?)"
        raise ModelError(f"model.pretrained: cannot load {path!r}{hint}: "
                         f"{str(e).splitlines()[0]}") from None
    family = family_of(model.config.model_type)
    if family is not None and getattr(model, family.bias_param, None) is None \
            and Path(path).is_dir():
        bias = saved_logit_bias(Path(path), family.bias_param)
        if bias is not None:  # a CLIP fine-tuned here with the sigmoid loss: see DualEncoder
            model.register_parameter(family.bias_param, nn.Parameter(bias.float()))
    ip = getattr(processor, "image_processor", None)
    if ip is not None and not is_pil_backend(ip):
        raise ModelError(f"model.pretrained: {path!r} loads a {type(ip).__name__} image "
                         f"processor although backend={IMAGE_BACKEND!r} was asked for; "
                         "training would preprocess differently from it")
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        prepare_tokenizer(tokenizer, family_of(model.config.model_type,
                                               type(tokenizer).__name__))
    return model, processor


def saved_logit_bias(model_dir: Path, name: str = "logit_bias") -> torch.Tensor | None:
    """The bias tensor `name` of a saved model directory, if its weights hold one.

    Hugging Face's loader drops (and reports as UNEXPECTED) a weight its class does not
    declare, such as the sigmoid bias `DualEncoder` adds to a CLIP; this reads it back."""
    from safetensors import safe_open

    files = [model_dir / "model.safetensors"]
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shard = json.loads(index.read_text()).get("weight_map", {}).get(name)
        files = [model_dir / shard] if shard else []
    for f in files:
        if f.is_file():
            with safe_open(str(f), "pt") as st:
                if name in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    return st.get_tensor(name)
    return None


def _features(out: Any) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features; older ones a tensor."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    return pooled if pooled is not None else out[0]


def image_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The vision tower's inputs in a batch (`families.IMAGE_KEYS` that it holds)."""
    return {k: batch[k] for k in IMAGE_KEYS if batch.get(k) is not None}


def forward_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """`DualEncoder.forward`'s keyword arguments from a batch (any family): the image
    inputs, or the cached `image_embeds`, and the text's `input_ids`/`attention_mask`."""
    out = {"pixel_values": None, **image_inputs(batch), "input_ids": batch["input_ids"]}
    for k in ("attention_mask", "image_embeds"):
        if batch.get(k) is not None:
            out[k] = batch[k]
    return out


class DualEncoder(nn.Module):
    """Both towers of a two-tower checkpoint (`sweeper.families`) behind one `forward`, so
    DDP sees every parameter used in a step (calling the towers' methods directly would
    bypass DDP's gradient hooks), with the temperature/bias the loss needs.

    `forward` returns L2-normalised image and text embeddings `[b, d]`. A frozen vision
    tower (`freeze_vision`: LiT, SigLiT) has `requires_grad=False` (so it is neither in the
    optimizer nor in DDP's buckets) and runs in eval mode under `no_grad` (no activations
    kept for it). The image inputs are whatever the family's processor makes (`pixel_values`,
    and for SigLIP 2 NaFlex `pixel_attention_mask` and `spatial_shapes`), passed through by
    name. The text tower gets the attention mask only where its family was trained with one.

    The towers, the temperature and the bias are where the model's family
    (`sweeper.families.Family`) says. The bias: the sigmoid loss trains the checkpoint's
    (SigLIP, SigLIP 2). A checkpoint without one (CLIP) trained with the sigmoid loss gets
    a new bias at the family's `init_bias` (-10), registered on the Hugging Face model
    itself, so the trial checkpoints, `save_pretrained` and `load_pretrained` all carry it.
    The softmax loss ignores the bias: it stays frozen (a SigLIP's is kept unchanged, a
    CLIP gets an unsaved placeholder for the metrics). The temperature always trains.
    """

    def __init__(self, model: nn.Module, loss: str = "sigmoid",
                 freeze_vision: bool = False) -> None:
        super().__init__()
        self.model = model
        self.freeze_vision = freeze_vision
        self.loss = loss
        self.family = family = family_of_model(model)
        self.text_mask = family.text_mask
        bias = getattr(model, family.bias_param, None)
        if bias is None:
            bias = nn.Parameter(torch.tensor([family.init_bias]))
            if loss == "sigmoid":
                model.register_parameter(family.bias_param, bias)
        self.logit_bias = bias
        # The softmax loss never touches the bias: keep it out of DDP and the optimizer.
        self.logit_bias.requires_grad_(loss == "sigmoid")
        if freeze_vision:
            for p in self.vision_parameters():
                p.requires_grad_(False)

    @property
    def logit_scale(self) -> nn.Parameter:
        return getattr(self.model, self.family.scale_param)

    def vision_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.family.tower_modules(self.model, "vision")
                for p in m.parameters()]

    def tower_of(self, name: str) -> str:
        """"text", "vision" or "logit" (the temperature and bias) for a parameter name of
        this module (`model.text_model...`, `logit_bias`)."""
        path = name.removeprefix("model.")
        if name == "logit_bias" or path in (self.family.scale_param, self.family.bias_param):
            return "logit"
        tower = self.family.tower_of(path)
        if tower is None:  # a family entry that misses a module: say so, never guess
            raise ModelError(f"model.pretrained: parameter {path!r} belongs to neither tower "
                             f"of {self.family.label} (sweeper.families)")
        return tower

    def param_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters of the model as trained (adapters included), each
        weight counted once."""
        params = {id(p): p for p in self.parameters()}.values()
        return (sum(p.numel() for p in params if p.requires_grad),
                sum(p.numel() for p in params))

    def train(self, mode: bool = True) -> DualEncoder:
        super().train(mode)
        if self.freeze_vision:
            for m in self.family.tower_modules(self.model, "vision"):
                m.eval()
        return self

    def encode_image(self, pixel_values: torch.Tensor, **image_kwargs: Any) -> torch.Tensor:
        """[b, d] normalised image embeddings; `image_kwargs`: the other image inputs of the
        batch (NaFlex: `pixel_attention_mask`, `spatial_shapes`)."""
        kwargs = {"pixel_values": pixel_values, **image_kwargs}
        encode = getattr(self.model, self.family.image_features)
        if self.freeze_vision:
            with torch.no_grad():
                feats = _features(encode(**kwargs))
        else:
            feats = _features(encode(**kwargs))
        return nn.functional.normalize(feats, dim=-1)

    def encode_text(self, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": input_ids}
        # SigLIP (1 and 2) was trained without an attention mask (it pools the last, padded
        # token): giving it one would change what it pools.
        if attention_mask is not None and self.text_mask:
            kwargs["attention_mask"] = attention_mask
        encode = getattr(self.model, self.family.text_features)
        return nn.functional.normalize(_features(encode(**kwargs)), dim=-1)

    def forward(self, pixel_values: torch.Tensor | None, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                image_embeds: torch.Tensor | None = None, **image_kwargs: Any
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image embeds, text embeds, logit_scale, logit_bias); the last two pass through
        forward so DDP treats them like every other parameter of the step. `image_embeds`
        (the frozen-tower cache) stands in for the image inputs."""
        img = image_embeds if image_embeds is not None else \
            self.encode_image(pixel_values, **image_kwargs)
        return img, self.encode_text(input_ids, attention_mask), self.logit_scale, self.logit_bias


def text_max_length(model: Any, processor: Any, override: int | None = None) -> int:
    """Padding length of the text tower: the spec's, else the model's positions (64 for the
    released SigLIP and SigLIP 2 checkpoints), capped by the tokenizer's limit."""
    if override:
        return override
    n_pos = getattr(model.config.text_config, "max_position_embeddings", None) or 64
    tok_max = getattr(processor.tokenizer, "model_max_length", n_pos) or n_pos
    return int(min(n_pos, tok_max))
