"""Models by preset, hub id or directory; the two-tower wrapper the worker trains.

`resolve_pretrained(model_spec)` turns `model.pretrained` into a directory or hub id that
`AutoModel.from_pretrained` / `AutoProcessor.from_pretrained` load, exactly as for a hub
checkpoint. The `tiny` preset is a small SigLIP with a word-level tokenizer, built offline
and pretrained once on synthetic data (see `sweeper.pretrain`), cached by its config.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

SIGLIP_INIT_SCALE = math.log(10.0)
SIGLIP_INIT_BIAS = -10.0


class ModelError(ValueError):
    """A model that cannot be loaded (one line, naming `model.pretrained`)."""


def build_tiny(tiny: Any, vocab: list[str]) -> tuple[Any, Any]:
    """A freshly initialised tiny SigLIP and its processor (word-level tokenizer).

    Temperature and bias start at the paper's init (log 10, -10): Hugging Face's fresh
    SiglipModel sets both to 0, from which a small model learns nothing in a few epochs.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.processors import TemplateProcessing
    from transformers import (
        PreTrainedTokenizerFast,
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
        SiglipProcessor,
    )

    specials = ["<pad>", "<unk>", "</s>"]
    table = {w: i for i, w in enumerate(specials + [w for w in vocab if w not in specials])}
    tok = Tokenizer(WordLevel(table, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="</s>",
        model_max_length=tiny.max_length,
    )
    size = tiny.image_size
    image_processor = SiglipImageProcessor(
        size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    h = tiny.hidden_size
    common = dict(hidden_size=h, intermediate_size=4 * h, num_hidden_layers=tiny.num_layers,
                  num_attention_heads=tiny.num_heads)
    config = SiglipConfig(
        text_config=dict(vocab_size=len(table), max_position_embeddings=tiny.max_length,
                         pad_token_id=0, eos_token_id=2, bos_token_id=2, **common),
        vision_config=dict(image_size=size, patch_size=tiny.patch_size, **common),
    )
    torch.manual_seed(tiny.seed)
    model = SiglipModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(SIGLIP_INIT_SCALE)
        model.logit_bias.fill_(SIGLIP_INIT_BIAS)
    return model, processor


def resolve_pretrained(model_spec: Any, cache_dir: str | Path | None = None) -> str:
    """A directory or hub id for `from_pretrained`; builds the tiny preset on first use."""
    name = model_spec.pretrained
    if name == "tiny":
        from sweeper.pretrain import ensure_tiny

        return str(ensure_tiny(model_spec.tiny, cache_dir))
    p = Path(name).expanduser()
    if p.exists() or name.startswith((".", "/", "~")):
        if not p.exists():
            raise ModelError(f"model.pretrained: directory {name!r} does not exist")
        if not (p / "config.json").is_file():
            raise ModelError(f"model.pretrained: {name!r} is not a model directory "
                             "(no config.json)")
        return str(p.resolve())
    return name


def check_loadable(model_spec: Any) -> None:
    """Refuse, before any trial starts, a model that cannot be found (offline hub, typo)."""
    name = model_spec.pretrained
    if name == "tiny":
        return
    path = resolve_pretrained(model_spec)
    if Path(path).is_dir():
        return
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        hf_hub_download(path, "config.json")
    except LocalEntryNotFoundError:
        raise ModelError(
            f"model.pretrained: {name!r} is not cached locally and the Hugging Face hub is "
            "unreachable (offline?); download it first or point to a directory"
        ) from None
    except (RepositoryNotFoundError, EntryNotFoundError):
        raise ModelError(f"model.pretrained: {name!r} is not a model on the hub") from None
    except Exception as e:  # network errors come in many types
        raise ModelError(
            f"model.pretrained: cannot fetch {name!r} from the hub ({type(e).__name__})"
        ) from None


def load_pretrained(model_spec: Any, cache_dir: str | Path | None = None) -> tuple[Any, Any]:
    """(model, processor) through `AutoModel`/`AutoProcessor.from_pretrained`."""
    from transformers import AutoModel, AutoProcessor

    path = resolve_pretrained(model_spec, cache_dir)
    trust = bool(model_spec.trust_remote_code)
    try:
        model = AutoModel.from_pretrained(path, trust_remote_code=trust)
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1)" if offline else " (hub unreachable or no such model?)"
        raise ModelError(f"model.pretrained: cannot load {model_spec.pretrained!r}{hint}: "
                         f"{str(e).splitlines()[0]}") from None
    return model, processor


def _features(out: Any) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features; older ones a tensor."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    return pooled if pooled is not None else out[0]


class DualEncoder(nn.Module):
    """Both towers of a SigLIP/CLIP checkpoint behind one `forward`, so DDP sees every
    parameter used in a step (calling the towers' methods directly would bypass DDP's
    gradient hooks), with the temperature/bias the loss needs.

    `forward` returns L2-normalised image and text embeddings `[b, d]`. A frozen vision
    tower runs in eval mode under `no_grad` (no activations kept for it). A CLIP checkpoint
    trained with the sigmoid loss gets a new bias initialised at -10.
    """

    def __init__(self, model: nn.Module, loss: str = "sigmoid",
                 freeze_vision: bool = False) -> None:
        super().__init__()
        self.model = model
        self.freeze_vision = freeze_vision
        self.loss = loss
        if getattr(model, "logit_bias", None) is not None:
            self.logit_bias = model.logit_bias
        else:
            self.logit_bias = nn.Parameter(torch.tensor([SIGLIP_INIT_BIAS]))
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

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.freeze_vision:
            with torch.no_grad():
                feats = _features(self.model.get_image_features(pixel_values=pixel_values))
        else:
            feats = _features(self.model.get_image_features(pixel_values=pixel_values))
        return nn.functional.normalize(feats, dim=-1)

    def encode_text(self, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": input_ids}
        # SigLIP was trained without an attention mask (it pools the last, padded token).
        if attention_mask is not None and self.model.config.model_type != "siglip":
            kwargs["attention_mask"] = attention_mask
        return nn.functional.normalize(_features(self.model.get_text_features(**kwargs)), dim=-1)

    def forward(self, pixel_values: torch.Tensor | None, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                image_embeds: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image embeds, text embeds, logit_scale, logit_bias); the last two pass through
        forward so DDP treats them like every other parameter of the step."""
        img = image_embeds if image_embeds is not None else self.encode_image(pixel_values)
        return img, self.encode_text(input_ids, attention_mask), self.logit_scale, self.logit_bias


def text_max_length(model: Any, processor: Any, override: int | None = None) -> int:
    """Padding length of the text tower: the spec's, else the model's positions (64 for the
    released SigLIP checkpoints), capped by the tokenizer's limit."""
    if override:
        return override
    n_pos = getattr(model.config.text_config, "max_position_embeddings", None) or 64
    tok_max = getattr(processor.tokenizer, "model_max_length", n_pos) or n_pos
    return int(min(n_pos, tok_max))
