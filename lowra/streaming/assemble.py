"""The last stage of streaming quantization: the quantized model assembled on the meta device.

Its ``LowRALinear`` layers come from the pass-2 block files, every other tensor (embeddings,
norms, ``lm_head``, biases) from the source checkpoint.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lowra.format import QuantizedTensor
from lowra.linear import LowRALinear
from lowra.model_layers import mark_only_lora_trainable
from lowra.streaming.partial import PartialDir
from lowra.streaming.source import source_key
from lowra.weights import ShardSource


def assemble_model(model: nn.Module, source: ShardSource, partial: PartialDir, blocks: list[tuple[str, list[str]]],
                   module_kw: dict[str, Any]) -> None:
    """Fill the meta ``model``: LowRALinear layers from the pass-2 block files, the rest from the source."""
    from lowra.model_layers import set_module

    src, dtype = source.reader, source.dtype
    targets = set()
    for i, (_, block_names) in enumerate(blocks):
        tensors, meta = partial.read("pass2", i)
        for name in block_names:
            prefix = f"{name}/"
            qstate = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            qt = QuantizedTensor.from_state_dict(qstate, meta["layers"][name]["quantized"])
            lora_A, lora_B = tensors.get(f"{name}.lora_A"), tensors.get(f"{name}.lora_B")
            bias = source.bias(name)
            bias = None if bias is None else bias.cpu()
            kw = dict(module_kw)
            if lora_A is not None:
                kw["adapter_dtype"] = lora_A.dtype
            new = LowRALinear(qt, bias=bias, lora_A=lora_A, lora_B=lora_B, **kw)
            set_module(model, name, new)
            targets.add(name)
        del tensors
    # every other persistent tensor (embeddings, norms, lm_head, biases of other layers) from the source
    wanted = [k for k in model.state_dict() if not k.endswith((".lora_A", ".lora_B"))
              and not any(k == f"{n}.bias" for n in targets)]
    tied = _tied_keys(model)
    rest = {}
    for key in wanted:
        try:
            rest[key] = src.load(source_key(model, src, key), dtype)
        except ValueError:
            if key not in tied:
                raise
    model.load_state_dict(rest, strict=False, assign=True)
    del rest
    if tied:
        model.tie_weights()
    leftover = [n for n, p in list(model.named_parameters()) + list(model.named_buffers())
                if p is not None and p.device.type == "meta" and n in model.state_dict()]
    if leftover:
        raise ValueError(f"the checkpoint at {src.directory} does not provide {leftover[:5]}")
    mark_only_lora_trainable(model)
    model.eval()


def _tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys that share a parameter with an earlier key (tied embeddings)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        else:
            seen[id(p)] = name
    return tied
