"""Parameter-efficient fine-tuning, a variant's `peft`: LoRA adapters through Hugging Face
peft (an optional extra), placed where the model's family says.

`wrap(model, peft, key)` puts the adapters on the Hugging Face model in place
(`peft.get_peft_model`: every other weight frozen) and returns the `PeftModel` around it;
the model keeps its module names with `...q_proj.base_layer` and `...q_proj.lora_A/B`
beneath, so the two-tower wrapper, DDP, the checkpoints and the evaluation run on it
unchanged. The temperature and the sigmoid bias train as in full fine-tuning.

Where: `target_modules` is a preset of the family (`Family.lora_presets`, block-relative
names under each tower's encoder blocks) or module names matched as peft matches them
(`target_modules`). Neither ever places an adapter on a module whose forward the model
bypasses: the children of a `torch.nn.MultiheadAttention` (SigLIP's vision pooling head
`vision_model.head.attention`), which reads its `out_proj` weights directly, so an adapter
there would get no gradient and never train, silently. A spec naming one is refused up
front (`sweeper.preflight`), naming the module.

At the end of a trial (`save`): the adapter in peft's own format (`PeftModel.from_pretrained`
loads it onto the pretrained model) and the model with the adapters merged into its weights
(`merge_and_unload`: a plain checkpoint, `AutoModel.from_pretrained` loads it).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sweeper.families import Family, ModelError, family_of_model
from sweeper.spec import PeftSpec, SpecError

INSTALL = 'pip install -e ".[peft]"'
# Beside the adapter in peft's format: the trained temperature and bias, which peft saves
# only for whole modules (`modules_to_save`) and these are bare parameters.
LOGIT_FILE = "logit_params.safetensors"


def installed() -> bool:
    """Whether Hugging Face peft can be imported."""
    return importlib.util.find_spec("peft") is not None


def require(key: str) -> None:
    """Refuse `key` (a variant's `peft`) when peft is not installed."""
    if not installed():
        raise SpecError(f"{key}: needs Hugging Face peft, which is not installed ({INSTALL}, "
                        "or pip install peft)")


def bypassed_modules(model: nn.Module) -> dict[str, str]:
    """{path: path of its MultiheadAttention} for every module of `model` whose forward is
    never called: the children of a `torch.nn.MultiheadAttention`, whose forward passes
    their weights to `F.multi_head_attention_forward` itself."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            out.update({f"{name}.{child}": name for child, _ in m.named_modules() if child})
    return out


def target_modules(model: nn.Module, family: Family, peft: PeftSpec, key: str) -> list[str]:
    """The full paths of the linear layers `peft` adapts in `model` (its towers
    `peft.towers`, resolved), in model order. Refuses (`SpecError` naming
    `key.target_modules`) a name that matches no module of those towers, one that matches
    a module the forward bypasses (`bypassed_modules`), and one that is not a linear
    layer."""
    key = f"{key}.target_modules"
    towers = peft.towers or ["text", "vision"]
    modules = dict(model.named_modules())
    bypassed = bypassed_modules(model)
    if isinstance(peft.target_modules, str):
        rel = family.lora_presets[peft.target_modules]
        names = []
        for t in towers:
            blocks = f"{family.tower(t).root}.{family.tower(t).blocks}"
            names += [f"{blocks}.{i}.{r}" for i in range(len(family.blocks(model, t)))
                      for r in rel]
        for name in names:  # a family entry that misnames its modules: say so
            if not isinstance(modules.get(name), nn.Linear) or name in bypassed:
                raise ModelError(f"{key}: the {family.label} preset {peft.target_modules!r} "
                                 f"names {name}, which is not a linear layer the forward "
                                 "calls (sweeper.families)")
        return names
    mine = [n for n in modules if family.tower_of(n) in towers]
    out: list[str] = []
    for i, want in enumerate(peft.target_modules):
        hits = [n for n in mine if n == want or n.endswith(f".{want}")]
        if not hits:
            raise SpecError(f"{key}[{i}]: {want!r} names no module of the "
                            f"{' and '.join(towers)} tower{'s' if len(towers) > 1 else ''} of "
                            f"{family.label}")
        for n in hits:
            if n in bypassed:
                raise SpecError(
                    f"{key}[{i}]: {want!r} names {n}, inside the torch.nn.MultiheadAttention "
                    f"{bypassed[n]}, whose forward reads its weights directly: an adapter there "
                    "would never train; name the encoder's modules (e.g. self_attn.out_proj) "
                    "or use a preset (attention, all-linear)")
            if not isinstance(modules[n], nn.Linear):
                raise SpecError(f"{key}[{i}]: {want!r} names {n}, a "
                                f"{type(modules[n]).__name__}; adapters go on linear layers "
                                "(torch.nn.Linear) only")
        out += [n for n in hits if n not in out]
    return out


def wrap(model: nn.Module, peft: PeftSpec, key: str) -> Any:
    """Put `peft`'s adapters on `model` (a Hugging Face two-tower model, changed in place)
    and return the `peft.PeftModel` around it; `key` (the variant's `peft`) names the spec
    in refusals. Everything but the adapters, the temperature and the bias is frozen."""
    require(key)
    from peft import LoraConfig, get_peft_model

    family = family_of_model(model)
    alpha = int(peft.alpha) if float(peft.alpha).is_integer() else peft.alpha
    config = LoraConfig(r=peft.r, lora_alpha=alpha, lora_dropout=peft.dropout,
                        target_modules=target_modules(model, family, peft, key), bias="none")
    adapted = get_peft_model(model, config)
    for name in (family.scale_param, family.bias_param):
        p = getattr(model, name, None)
        if isinstance(p, nn.Parameter):  # DualEncoder keeps a softmax loss's bias frozen
            p.requires_grad_(True)
    return adapted


def save(adapted: Any, adapter_dir: Path) -> nn.Module:
    """Save the adapter of `adapted` (a `PeftModel`) in peft's format into `adapter_dir`,
    with the trained temperature and bias (`LOGIT_FILE`), then merge the adapters into the
    model's weights and return the plain model (in place: the trial is over)."""
    from safetensors.torch import save_file

    adapted.save_pretrained(str(adapter_dir))
    model = adapted.get_base_model()
    family = family_of_model(model)
    logit = {n: getattr(model, n).detach().cpu().contiguous()
             for n in (family.scale_param, family.bias_param)
             if isinstance(getattr(model, n, None), torch.Tensor)}
    save_file(logit, str(adapter_dir / LOGIT_FILE))
    return adapted.merge_and_unload()
