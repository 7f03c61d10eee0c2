"""Models by preset, hub id or directory; the two-tower wrapper the worker trains.

`load_pretrained(path)` loads a checkpoint directory through `AutoModel.from_pretrained` /
`AutoProcessor.from_pretrained`. `sweeper.prepare` resolves `model.pretrained` to such a
directory once, before trials launch: the presets are built here (`build_tiny`,
`build_tiny_clip`, `build_tiny_siglip2`) and pretrained once on synthetic data by
`sweeper.pretrain`, cached by their config `model.tiny`: `tiny` is a small SigLIP,
`tiny-clip` a CLIP of the same shape (both with a word-level tokenizer), `tiny-siglip2` a
SigLIP 2 NaFlex with a Gemma-style BPE tokenizer. What differs between the families is in
`sweeper.families`, the only other module of sweeper imported here.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sweeper.families import FAMILIES, IMAGE_KEYS, ModelError, family_of, prepare_tokenizer

__all__ = ["ModelError"]  # defined with the families; raised by the loaders here

SIGLIP_INIT_SCALE = math.log(10.0)
SIGLIP_INIT_BIAS = -10.0
# `model.pretrained` -> architecture (model type) of the offline presets.
PRESETS = {"tiny": "siglip", "tiny-clip": "clip", "tiny-siglip2": "siglip2"}
GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")  # ids 0-4, as in Gemma


def _word_tokenizer(vocab: list[str], max_length: int, bos: str | None, eos: str,
                    template: str) -> Any:
    """A lower-casing word-level fast tokenizer: ids `<pad>` = 0, `<unk>` = 1, then `bos`
    (if any), `eos`, then `vocab`; `template` (TemplateProcessing syntax) adds bos/eos."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", *([bos] if bos else []), eos]
    table = {w: i for i, w in enumerate(specials + [w for w in vocab if w not in specials])}
    tok = Tokenizer(WordLevel(table, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.post_processor = TemplateProcessing(
        single=template, special_tokens=[(t, table[t]) for t in specials[2:]])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token=eos, model_max_length=max_length,
                                   **({"bos_token": bos} if bos else {}))


def _tower_sizes(tiny: Any) -> dict[str, int]:
    h = tiny.hidden_size
    return dict(hidden_size=h, intermediate_size=4 * h, num_hidden_layers=tiny.num_layers,
                num_attention_heads=tiny.num_heads)


def build_tiny(tiny: Any, vocab: list[str]) -> tuple[Any, Any]:
    """A freshly initialised tiny SigLIP and its processor (word-level tokenizer).

    Temperature and bias start at the paper's init (log 10, -10): Hugging Face's fresh
    SiglipModel sets both to 0, from which a small model learns nothing in a few epochs.
    """
    from transformers import SiglipConfig, SiglipModel, SiglipProcessor

    tokenizer = _word_tokenizer(vocab, tiny.max_length, None, "</s>", "$A </s>")
    size = tiny.image_size
    image_processor = _pil_processor_class("SiglipImageProcessor")(
        size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = SiglipConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=tiny.max_length,
                         pad_token_id=0, eos_token_id=2, bos_token_id=2, **_tower_sizes(tiny)),
        vision_config=dict(image_size=size, patch_size=tiny.patch_size, **_tower_sizes(tiny)),
    )
    return _sigmoid_init(SiglipModel, config, tiny.seed), processor


def _sigmoid_init(model_class: Any, config: Any, seed: int) -> Any:
    """A fresh `model_class(config)` (seeded) with the SigLIP paper's temperature and bias."""
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():
        model.logit_scale.fill_(SIGLIP_INIT_SCALE)
        model.logit_bias.fill_(SIGLIP_INIT_BIAS)
    return model


def build_tiny_clip(tiny: Any, vocab: list[str]) -> tuple[Any, Any]:
    """A freshly initialised tiny CLIP and its processor, laid out like the hub's CLIP
    checkpoints: start/end-of-text tokens around the text (the text tower pools the first
    end-of-text token, so padding is masked and never pooled), a `CLIPImageProcessor`
    resizing the shortest edge then centre-cropping, the OpenAI mean/std, and CLIP's own
    temperature init (1/0.07) and no bias.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    tokenizer = _word_tokenizer(vocab, tiny.max_length, "<|startoftext|>", "<|endoftext|>",
                                "<|startoftext|> $A <|endoftext|>")
    size = tiny.image_size
    image_processor = _pil_processor_class("CLIPImageProcessor")(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        do_center_crop=True)
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    # eos_token_id must not be 2: HF's CLIP reads 2 as the original checkpoints' marker and
    # then pools at the highest token id (the original vocabulary's end-of-text) instead.
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=tiny.max_length,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3, **_tower_sizes(tiny)),
        vision_config=dict(image_size=size, patch_size=tiny.patch_size, **_tower_sizes(tiny)),
        projection_dim=tiny.hidden_size,
    )
    torch.manual_seed(tiny.seed)
    return CLIPModel(config), processor


def gemma_style_bpe(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a small BPE laid out like Gemma's (specials `<pad>` = 0, `<eos>`,
    `<bos>`, `<unk>`, `<mask>`; `▁` marks a space), trained so that each of `words`, with
    or without a leading space, is one token: what `GemmaTokenizer` / `Siglip2Tokenizer`
    take as `vocab` and `merges`."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    # Learn merges within words only (Gemma's tokenizer never splits its input).
    tok.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=50_000, special_tokens=list(GEMMA_SPECIALS),
                                  show_progress=False)
    tok.train_from_iterator([" ".join(words), *words], trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                            for m in model["merges"]]


def build_tiny_siglip2(tiny: Any, vocab: list[str]) -> tuple[Any, Any]:
    """A freshly initialised tiny SigLIP 2 NaFlex and its processor: a `Siglip2Model`, a
    `Siglip2ImageProcessor` whose patch budget covers a square `image_size` image, and a
    `Siglip2Tokenizer` (Gemma-style BPE, lower-casing) that appends end-of-sequence and pads
    on the right. Temperature and bias at the paper's init, as `build_tiny`."""
    from transformers import Siglip2Config, Siglip2Model, Siglip2Processor, Siglip2Tokenizer

    words, merges = gemma_style_bpe(vocab)
    tokenizer = Siglip2Tokenizer(vocab=words, merges=merges, add_bos_token=False,
                                 add_eos_token=True, padding_side="right",
                                 model_max_length=tiny.max_length)
    n_patches = (tiny.image_size // tiny.patch_size) ** 2
    image_processor = _pil_processor_class("Siglip2ImageProcessor")(
        patch_size=tiny.patch_size, max_num_patches=n_patches)
    processor = Siglip2Processor(image_processor=image_processor, tokenizer=tokenizer)
    config = Siglip2Config(
        text_config=dict(vocab_size=len(words), max_position_embeddings=tiny.max_length,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2, **_tower_sizes(tiny)),
        vision_config=dict(patch_size=tiny.patch_size, num_patches=n_patches,
                           **_tower_sizes(tiny)),
    )
    return _sigmoid_init(Siglip2Model, config, tiny.seed), processor


BUILDERS = {"siglip": build_tiny, "clip": build_tiny_clip, "siglip2": build_tiny_siglip2}


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


def _pil_processor_class(name: str) -> Any:
    """transformers' PIL-backed image processor `name` (`SiglipImageProcessorPil`), or the
    plain class on a transformers without the split backends."""
    import transformers

    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


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
    if getattr(model, "logit_bias", None) is None and Path(path).is_dir():
        bias = saved_logit_bias(Path(path))
        if bias is not None:  # a CLIP fine-tuned here with the sigmoid loss: see DualEncoder
            model.register_parameter("logit_bias", nn.Parameter(bias.float()))
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


def saved_logit_bias(model_dir: Path) -> torch.Tensor | None:
    """The `logit_bias` tensor of a saved model directory, if its weights hold one.

    Hugging Face's loader drops (and reports as UNEXPECTED) a weight its class does not
    declare, such as the sigmoid bias `DualEncoder` adds to a CLIP; this reads it back."""
    from safetensors import safe_open

    files = [model_dir / "model.safetensors"]
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shard = json.loads(index.read_text()).get("weight_map", {}).get("logit_bias")
        files = [model_dir / shard] if shard else []
    for f in files:
        if f.is_file():
            with safe_open(str(f), "pt") as st:
                if "logit_bias" in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    return st.get_tensor("logit_bias")
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

    The bias: the sigmoid loss trains the checkpoint's `logit_bias` (SigLIP, SigLIP 2). A
    checkpoint without one (CLIP) trained with the sigmoid loss gets a new bias initialised
    at -10, registered on the Hugging Face model itself, so the trial checkpoints,
    `save_pretrained` and `load_pretrained` all carry it. The softmax loss ignores the bias:
    it stays frozen (a SigLIP's is kept unchanged, a CLIP gets an unsaved placeholder for
    the metrics).
    """

    def __init__(self, model: nn.Module, loss: str = "sigmoid",
                 freeze_vision: bool = False) -> None:
        super().__init__()
        self.model = model
        self.freeze_vision = freeze_vision
        self.loss = loss
        family = FAMILIES.get(getattr(model.config, "model_type", ""))
        self.text_mask = family.text_mask if family else True
        bias = getattr(model, "logit_bias", None)
        if bias is None:
            bias = nn.Parameter(torch.tensor([SIGLIP_INIT_BIAS]))
            if loss == "sigmoid":
                model.register_parameter("logit_bias", bias)
        self.logit_bias = bias
        # The softmax loss never touches the bias: keep it out of DDP and the optimizer.
        self.logit_bias.requires_grad_(loss == "sigmoid")
        if freeze_vision:
            for p in self.vision_parameters():
                p.requires_grad_(False)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    def vision_parameters(self) -> list[nn.Parameter]:
        vision = [m for n, m in self.model.named_children() if "vision" in n or "visual" in n]
        return [p for m in vision for p in m.parameters()]

    def train(self, mode: bool = True) -> DualEncoder:
        super().train(mode)
        if self.freeze_vision:
            for name, child in self.model.named_children():
                if "vision" in name or "visual" in name:
                    child.eval()
        return self

    def encode_image(self, pixel_values: torch.Tensor, **image_kwargs: Any) -> torch.Tensor:
        """[b, d] normalised image embeddings; `image_kwargs`: the other image inputs of the
        batch (NaFlex: `pixel_attention_mask`, `spatial_shapes`)."""
        kwargs = {"pixel_values": pixel_values, **image_kwargs}
        if self.freeze_vision:
            with torch.no_grad():
                feats = _features(self.model.get_image_features(**kwargs))
        else:
            feats = _features(self.model.get_image_features(**kwargs))
        return nn.functional.normalize(feats, dim=-1)

    def encode_text(self, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": input_ids}
        # SigLIP (1 and 2) was trained without an attention mask (it pools the last, padded
        # token): giving it one would change what it pools.
        if attention_mask is not None and self.text_mask:
            kwargs["attention_mask"] = attention_mask
        return nn.functional.normalize(_features(self.model.get_text_features(**kwargs)), dim=-1)

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
