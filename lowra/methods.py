"""The runner-facing methods of issue 7: LoRA, QLoRA, LoftQ, ModuLoRA (OPTQ) and LowRA.

Every method runs through the same format (``QuantizedTensor``), kernels, ``LowRALinear``,
training loop and evaluation; a ``MethodSpec`` says only what differs: the quantizer behind
``lowra.quantize_model(method=...)``, the budgets it accepts, the adapter init, the absmax storage
and the optimizer. ``conf/quant/<name>.yaml`` mirrors these specs for the Hydra runner
(``quant=<name>``); ``check_budget`` is the one place that refuses an unsupported budget.

| method   | quantizer | budgets (code bits)  | init                 | double quant | optimizer (CUDA / CPU)   |
|----------|-----------|----------------------|----------------------|--------------|--------------------------|
| lora     | none      | ignored (16-bit base)| standard (B = 0)     | —            | adamw                    |
| qlora    | nf        | {4}                  | standard (B = 0)     | yes (8-bit)  | paged_adamw_8bit / adamw |
| loftq    | nf        | {2, 4}               | LoftQ, T = 1         | no           | adamw                    |
| modulora | optq      | {2, 3, 4}            | standard (B = 0)     | no           | adamw                    |
| lowra    | lowra     | any in [1, 4]        | LoftQ, T = 1         | no           | adamw                    |

Notes: QLoRA's NF4 uses blocks of 64 and double-quantizes the absmax to 8 bits in blocks of 256
(``lowra.scales``); its paged 8-bit AdamW needs bitsandbytes on CUDA, so on a CPU the run uses
plain AdamW and records that (``optimizer_for``). LoftQ's published code supports NF4 (PEFT) and
NF2 (the LoftQ repository); ModuLoRA's OPTQ needs calibration Hessians
(``lowra.calibration.collect_hessians``, run by ``lowra.quantize_model(calibration=...)`` on the
full-precision model) and quantizes every matrix at one width.

LowRA's ablations are ``lowra.quantize_model`` options exposed as ``quant.<key>=`` overrides of
``conf/quant/lowra.yaml`` (the keys of ``MethodSpec.ablations``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["METHODS", "MethodSpec", "check_budget", "get_method", "optimizer_for"]

STANDARD_INIT = "standard"
LOFTQ_INIT = "loftq"
CALIBRATED_INIT = "calibrated"


@dataclass(frozen=True)
class MethodSpec:
    """One runner-facing method.

    Attributes:
        name: the runner's ``quant=`` choice.
        quantizer: ``lowra.quantize_model(method=...)``: "none", "nf", "optq" or "lowra".
        budget_choices: the integer widths accepted (every row at that width), or None.
        budget_range: ``(low, high)`` accepted average budgets (fractional allowed), or None.
            Both None: the budget is ignored (no quantization).
        init: "standard" (A Kaiming, B = 0), "loftq" (SVD of the quantization residual) or
            "calibrated" (the residual fitted in the activation norm, from calibration text).
        loftq_iters: default LoftQ alternations T (0 with the standard init).
        double_quant: default absmax storage (True: 8-bit double quantization, QLoRA).
        group_size: inputs per absmax group.
        paged_optimizer: use bitsandbytes' paged 8-bit AdamW when training on CUDA.
        needs_calibration: the method needs calibration text (input Hessians, Fisher statistics).
        nominal_bits: bits of the frozen base when it is not quantized (LoRA's 16-bit base).
        reference: the system being reproduced.
        ablations: option → meaning, for the ablation switches of the method.
    """

    name: str
    quantizer: str
    budget_choices: tuple[int, ...] | None
    budget_range: tuple[float, float] | None
    init: str
    loftq_iters: int
    double_quant: bool = False
    group_size: int = 64
    paged_optimizer: bool = False
    needs_calibration: bool = False
    nominal_bits: float | None = None
    reference: str = ""
    ablations: dict[str, str] = field(default_factory=dict)

    @property
    def ignores_budget(self) -> bool:
        return self.budget_choices is None and self.budget_range is None

    def accepted(self) -> str:
        """Human-readable accepted budgets, e.g. ``"{2, 4} bits"``."""
        if self.ignores_budget:
            return f"any (ignored: the base stays at {self.nominal_bits:g} bits)"
        if self.budget_choices is not None:
            return "{" + ", ".join(str(b) for b in self.budget_choices) + "} bits"
        low, high = self.budget_range
        return f"any budget in [{low:g}, {high:g}] bits"


_LOWRA_ABLATIONS = {
    "error=kfac|fisher|measured|relative|sse": "the planner's error table (lowra.error_tables)",
    "init=calibrated|loftq": "adapter init in the activation norm or LoftQ's weight norm",
    "budget_kind=nominal|effective": "the budget counts code bits or every stored bit",
    "codebook=nf": "NormalFloat tables instead of learned per-row codebooks",
    "plan=uniform": "every row at the integer budget instead of the precision plan",
    "loftq_iters=0": "standard LoRA init (no LoftQ)",
    "init_codebooks=relearn": "the init's re-quantizations relearn each row's codebook on W - sBA (loftq_iters >= 2)",
    "low_bits_init=null|{below:b,loftq_iters:T,init_codebooks:c}": "the init of budgets below b code bits",
    "weight_power=1|2": "Lloyd-Max element weight absmax**p",
    "candidates=[1,2,4]|[1,2,3,4]": "widths a channel may take",
    "group_size=G": "inputs per absmax group",
}

METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec(
            name="lora", quantizer="none", budget_choices=None, budget_range=None, init=STANDARD_INIT,
            loftq_iters=0, nominal_bits=16.0,
            reference="LoRA (Hu et al. 2021): full-precision frozen base, B = 0",
        ),
        MethodSpec(
            name="qlora", quantizer="nf", budget_choices=(4,), budget_range=None, init=STANDARD_INIT,
            loftq_iters=0, double_quant=True, paged_optimizer=True,
            reference="QLoRA (Dettmers et al. 2023): NF4, blocks of 64, double-quantized absmax "
                      "(8-bit, blocks of 256), paged 8-bit AdamW",
        ),
        MethodSpec(
            name="loftq", quantizer="nf", budget_choices=(2, 4), budget_range=None, init=LOFTQ_INIT,
            loftq_iters=1,
            reference="LoftQ (Li et al. 2023): NormalFloat at one width + alternating low-rank init",
        ),
        MethodSpec(
            name="modulora", quantizer="optq", budget_choices=(2, 3, 4), budget_range=None,
            init=STANDARD_INIT, loftq_iters=0, needs_calibration=True,
            reference="ModuLoRA (Yin et al. 2023): any black-box quantizer (OPTQ/GPTQ here) behind a "
                      "quantization-agnostic forward/backward",
        ),
        MethodSpec(
            name="lowra", quantizer="lowra", budget_choices=None, budget_range=(1.0, 4.0), init=CALIBRATED_INIT,
            loftq_iters=1, needs_calibration=True,
            reference="LowRA (Zhou et al. 2025), measured default: learned per-channel codebooks at 1/2/3/4 bits, "
                      "ILP plan on a Kronecker-factored Fisher error table, calibrated adapter init",
            ablations=_LOWRA_ABLATIONS,
        ),
        MethodSpec(
            name="lowra_paper", quantizer="lowra", budget_choices=None, budget_range=(1.0, 4.0), init=LOFTQ_INIT,
            loftq_iters=1,
            reference="LowRA as published (Zhou et al. 2025): learned per-channel codebooks at 1/2/4 bits, ILP "
                      "plan on the data-free weight SSE, LoftQ init",
            ablations=_LOWRA_ABLATIONS,
        ),
    )
}


def get_method(name: str) -> MethodSpec:
    """The spec of method ``name``; an unknown name raises ValueError listing the methods."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def check_budget(method: str, bits: float | int | None) -> float | int | None:
    """Validate a bit budget for ``method``.

    Returns the budget in the form the quantizer takes: an int for the one-width methods (qlora,
    loftq, modulora), a float for lowra, None for lora (the budget is ignored).

    Raises:
        ValueError: naming the method and its accepted budgets, e.g.
            ``"method 'loftq' accepts {2, 4} bits, got 3"``.
    """
    spec = get_method(method)
    if spec.ignores_budget:
        return None
    try:
        value = float(bits)
    except (TypeError, ValueError):
        raise ValueError(f"method {method!r} needs a numeric bit budget ({spec.accepted()}), got {bits!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"method {method!r} accepts {spec.accepted()}, got {bits!r}")
    if spec.budget_choices is not None:
        for b in spec.budget_choices:
            if math.isclose(value, b, abs_tol=1e-9):
                return int(b)
        raise ValueError(f"method {method!r} accepts {spec.accepted()}, got {bits!r}")
    low, high = spec.budget_range
    if not low - 1e-9 <= value <= high + 1e-9:
        raise ValueError(f"method {method!r} accepts {spec.accepted()}, got {bits!r}")
    return value


def optimizer_for(method: str, device: str = "cpu", bnb_available: bool | None = None) -> str:
    """The optimizer a run of ``method`` uses on ``device`` (record it in results.json).

    ``"paged_adamw_8bit"`` (``bitsandbytes.optim.PagedAdamW8bit``) for QLoRA on CUDA when
    bitsandbytes imports, else ``"adamw"`` (``torch.optim.AdamW``).
    """
    spec = get_method(method)
    if not spec.paged_optimizer or not str(device).startswith("cuda"):
        return "adamw"
    if bnb_available is None:
        try:
            import bitsandbytes  # noqa: F401
        except Exception:  # any import failure means: not usable here
            bnb_available = False
        else:
            bnb_available = True
    return "paged_adamw_8bit" if bnb_available else "adamw"
