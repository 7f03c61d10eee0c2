"""The builders of the offline tiny presets: a freshly initialised small model of a family
and its processor, laid out like the family's hub checkpoints.

Each builder takes the preset's shape (`spec.TinyModelSpec`) and a word list, and returns
`(model, processor)` with the model class's own initialisation (seeded by `tiny.seed`);
`families.Family.build` calls it and then sets the family's temperature and bias inits.
`sweeper.pretrain` pretrains the result once on synthetic data. Imports nothing of
sweeper; torch, tokenizers and transformers only inside the builders.
"""

from __future__ import annotations

import json
from typing import Any

GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")  # ids 0-4, as in Gemma


def pil_processor_class(name: str) -> Any:
    """transformers' PIL-backed image processor `name` (`SiglipImageProcessorPil`), or the
    plain class on a transformers without the split backends."""
    import transformers

    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


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


def _seeded(model_class: Any, config: Any, seed: int) -> Any:
    import torch

    torch.manual_seed(seed)
    return model_class(config)


def siglip(tiny: Any, vocab: list[str]) -> tuple[Any, Any]:
    """A tiny SigLIP and its processor (word-level tokenizer, no start token)."""
    from transformers import SiglipConfig, SiglipModel, SiglipProcessor

    tokenizer = _word_tokenizer(vocab, tiny.max_length, None, "</s>", "$A </s>")
    size = tiny.image_size
    image_processor = pil_processor_class("SiglipImageProcessor")(
        size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = SiglipConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=tiny.max_length,
                         pad_token_id=0, eos_token_id=2, bos_token_id=2, **_tower_sizes(tiny)),
        vision_config=dict(image_size=size, patch_size=tiny.patch_size, **_tower_sizes(tiny)),
    )
    return _seeded(SiglipModel, config, tiny.seed), processor


def clip(tiny: Any, vocab: list[str]) -> tuple[Any, Any]:
    """A tiny CLIP and its processor, laid out like the hub's CLIP checkpoints:
    start/end-of-text tokens around the text (the text tower pools the first end-of-text
    token, so padding is masked and never pooled), a `CLIPImageProcessor` resizing the
    shortest edge then centre-cropping, the OpenAI mean/std, CLIP's own temperature init
    (1/0.07) and no bias."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    tokenizer = _word_tokenizer(vocab, tiny.max_length, "<|startoftext|>", "<|endoftext|>",
                                "<|startoftext|> $A <|endoftext|>")
    size = tiny.image_size
    image_processor = pil_processor_class("CLIPImageProcessor")(
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
    return _seeded(CLIPModel, config, tiny.seed), processor


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


def siglip2(tiny: Any, vocab: list[str]) -> tuple[Any, Any]:
    """A tiny SigLIP 2 NaFlex and its processor: a `Siglip2Model`, a
    `Siglip2ImageProcessor` whose patch budget covers a square `image_size` image, and a
    `Siglip2Tokenizer` (Gemma-style BPE, lower-casing) that appends end-of-sequence and pads
    on the right."""
    from transformers import Siglip2Config, Siglip2Model, Siglip2Processor, Siglip2Tokenizer

    words, merges = gemma_style_bpe(vocab)
    tokenizer = Siglip2Tokenizer(vocab=words, merges=merges, add_bos_token=False,
                                 add_eos_token=True, padding_side="right",
                                 model_max_length=tiny.max_length)
    n_patches = (tiny.image_size // tiny.patch_size) ** 2
    image_processor = pil_processor_class("Siglip2ImageProcessor")(
        patch_size=tiny.patch_size, max_num_patches=n_patches)
    processor = Siglip2Processor(image_processor=image_processor, tokenizer=tokenizer)
    config = Siglip2Config(
        text_config=dict(vocab_size=len(words), max_position_embeddings=tiny.max_length,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2, **_tower_sizes(tiny)),
        vision_config=dict(patch_size=tiny.patch_size, num_patches=n_patches,
                           **_tower_sizes(tiny)),
    )
    return _seeded(Siglip2Model, config, tiny.seed), processor
