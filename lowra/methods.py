"""Quantization methods as objects, and the runner's presets of them.

A :class:`Method` (one per ``LowRAConfig.method``: ``lowra``, ``nf``, ``uniform``, ``optq``, any
other registered quantizer, and ``none``) says in ONE place everything that differs between
methods, and every stage, the streaming path, ``LowRAConfig`` and the runner's checks ask it:

- its own config (:attr:`Method.options_class`: a dataclass validated in ``__post_init__``,
  ``LowRAConfig.method_config``; :class:`LowRAOptions` for LowRA, the empty :class:`MethodOptions`
  for the others; :attr:`Method.fields` are its field names, which the runner reads from ``quant.*``
  for this method only) and the checks that span the common fields (:meth:`Method.check`, called by
  ``LowRAConfig.__post_init__``);
- the budgets it accepts (:meth:`Method.check_bits`: THE place ``bits`` is validated);
- its layer quantizer (:meth:`Method.layer_quantizer`: ``[out, in] → QuantizedTensor``, through
  the quantizer registry ``lowra.quantizers`` for every method, LowRA included);
- whether it plans precision (:meth:`Method.plans`), what calibration statistics it needs
  (:meth:`Method.needs` → :class:`CalibrationNeeds`), its default adapter init.

As torchao's ``quantize_`` maps a config type to its handler, ``method_of(name)`` maps
``LowRAConfig.method`` to its object; a new quantizer registered with
``lowra.quantizers.register_quantizer`` is a method at once (:class:`QuantizerMethod`).

The runner-facing presets (``conf/quant/<name>.yaml``) are :data:`METHODS` (issue 7: LoRA, QLoRA,
LoftQ, ModuLoRA (OPTQ), LowRA and its paper preset): a :class:`MethodSpec` names the method and
what the preset fixes (budgets, init, absmax storage, optimizer).

| preset      | method | budgets (code bits)  | init                 | double quant | optimizer (CUDA / CPU)   |
|-------------|--------|----------------------|----------------------|--------------|--------------------------|
| lora        | none   | ignored (16-bit base)| standard (B = 0)     | —            | adamw                    |
| qlora       | nf     | {4}                  | standard (B = 0)     | yes (8-bit)  | paged_adamw_8bit / adamw |
| loftq       | nf     | {2, 4}               | LoftQ, T = 1         | no           | adamw                    |
| modulora    | optq   | {2, 3, 4}            | standard (B = 0)     | no           | adamw                    |
| lowra       | lowra  | any in [1, 4]        | calibrated, T = 1    | no           | adamw                    |
| lowra_paper | lowra  | any in [1, 4]        | LoftQ, T = 1         | no           | adamw                    |

Notes: QLoRA's NF4 uses blocks of 64 and double-quantizes the absmax to 8 bits in blocks of 256
(``lowra.scales``); its paged 8-bit AdamW needs bitsandbytes on CUDA, so on a CPU the run uses
plain AdamW and records that (``optimizer_for``). LoftQ's published code supports NF4 (PEFT) and
NF2 (the LoftQ repository); ModuLoRA's OPTQ needs calibration Hessians (collected by
``lowra.quantize_model(calibration=...)`` on the full-precision model) and quantizes every matrix
at one width. LowRA's ablations are ``quant.<key>=`` overrides of ``conf/quant/lowra.yaml`` (the
keys of ``MethodSpec.ablations``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from lowra.config_values import integer, low_bits_init, number, string

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from lowra.config import LowRAConfig
    from lowra.format import QuantizedTensor

__all__ = [
    "METHODS", "METHOD_DEFAULT", "CalibrationNeeds", "LowRAMethod", "LowRAOptions", "Method", "MethodOptions",
    "MethodSpec", "NoQuantization", "QuantizerMethod", "get_method", "method_names", "method_of", "optimizer_for",
    "unstreamable",
]

STANDARD_INIT = "standard"
LOFTQ_INIT = "loftq"
CALIBRATED_INIT = "calibrated"
#: ``LowRAConfig`` fields of the adapter init: read for every quantizing method, unused by ``none``.
INIT_FIELDS = ("init", "init_damp")
class _MethodDefault:
    """The default of a ``LowRAConfig`` field that depends on the method (``Method.defaults``)."""

    def __repr__(self) -> str:
        return "METHOD_DEFAULT"


#: A ``LowRAConfig`` field left at this takes its method's default (:attr:`Method.defaults`).
METHOD_DEFAULT: Any = _MethodDefault()
#: The error tables that read calibration text (``lowra.error_tables.DATA_TABLES``).
DATA_TABLES = ("fisher", "kfac", "measured")


# ------------------------------------------------------------------------------ calibration needs
@dataclass(frozen=True)
class CalibrationNeeds:
    """What a config needs from calibration text, per target layer.

    ``fisher``: diagonal empirical Fisher ``[out, in]`` (``error=fisher|measured``,
    ``fisher_codebooks``); ``hessians``: input Grams ``[in, in]`` (``error=kfac``, the calibrated
    init); ``output_grads``: K-FAC output factors ``[out]`` (``error=kfac``); ``layer_hessians``:
    the quantizer's own ``hessian=`` per layer (OPTQ); ``init``: the calibrated init reads the
    Grams (so they live until the layer is quantized); ``in_memory``: the whole model must be in
    memory (``error=measured`` runs it once per layer and width); ``why``: the option that asks.
    """

    fisher: bool = False
    hessians: bool = False
    output_grads: bool = False
    layer_hessians: bool = False
    init: bool = False
    in_memory: bool = False
    why: str = ""

    @property
    def any(self) -> bool:
        return self.fisher or self.hessians or self.output_grads or self.layer_hessians

    @property
    def gradients(self) -> bool:
        """The statistics need the loss gradient (a backward pass), not only a forward."""
        return self.fisher or self.output_grads


# ----------------------------------------------------------------------------- method options
@dataclass
class MethodOptions:
    """The options of a method that has none of its own (``none``, ``nf``, ``uniform``, ``optq``, …; a
    registered quantizer's free-form options are ``LowRAConfig.quant_options``). A method with its own
    options subclasses it: a dataclass whose ``__post_init__`` types and checks every field, each error
    naming the field (``LowRAConfig.method_config``, as PEFT's ``LoraConfig.loftq_config``)."""

    #: the method these options belong to (for messages)
    method: ClassVar[str] = ""

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_values(cls, method: str, values: Mapping[str, Any]) -> MethodOptions:
        """The options of ``method`` from ``values`` (name → value); a name it does not take is a
        ValueError naming the field and the method."""
        unknown = [k for k in values if k not in cls.option_names()]
        if unknown:
            owner = "a LowRA option" if unknown[0] in LowRAOptions.option_names() else "not an option"
            raise ValueError(f"{unknown[0]} is {owner}; method={method!r} does not take it")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Every option as a JSON-safe value (tuples as lists)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


#: ``LowRAOptions.low_bits_init`` of the runner's ``quant=lowra``: below 2 code bits, 4 alternations
#: that relearn the codebooks (issue 12)
LOW_BITS_DEFAULT = {"below": 2.0, "loftq_iters": 4, "init_codebooks": "relearn"}


@dataclass
class LowRAOptions(MethodOptions):
    """LowRA's own options (``LowRAConfig.method_config`` of ``method="lowra"``; every field is
    documented on :class:`lowra.config.LowRAConfig`). Defaults: the runner's ``quant=lowra``."""

    method: ClassVar[str] = "lowra"

    codebook: str = "learned"
    codebook_iters: int = 20
    weight_power: float = 2.0
    plan: str = "ilp"
    budget_scope: str = "model"
    budget_kind: str = "nominal"
    error: str = "kfac"
    fisher_codebooks: bool = False
    measure_windows: int = 16
    init_codebooks: str = "fixed"
    low_bits_init: dict[str, Any] | None = field(default_factory=lambda: dict(LOW_BITS_DEFAULT))

    def __post_init__(self) -> None:
        for name in ("codebook_iters", "measure_windows"):
            setattr(self, name, integer(name, getattr(self, name)))
        self.weight_power = number("weight_power", self.weight_power)
        if not isinstance(self.fisher_codebooks, bool):
            raise ValueError(f"fisher_codebooks must be true or false, got {self.fisher_codebooks!r}")
        for name in ("codebook", "plan", "budget_scope", "budget_kind", "error", "init_codebooks"):
            setattr(self, name, string(name, getattr(self, name)))
        if self.low_bits_init is not None:
            self.low_bits_init = low_bits_init(self.low_bits_init)
        self._check_choices()
        if self.codebook_iters < 0:
            raise ValueError(f"codebook_iters must be a non-negative integer, got {self.codebook_iters!r}")
        if self.measure_windows < 1:
            raise ValueError(f"measure_windows must be a positive integer, got {self.measure_windows!r}")
        if self.init_codebooks == "relearn" and self.codebook != "learned":
            raise ValueError("quant.init_codebooks=relearn needs method='lowra' with learned codebooks "
                             f"(got method='lowra', codebook={self.codebook!r})")
        if self.fisher_codebooks and self.error != "fisher":
            raise ValueError("fisher_codebooks=True needs error='fisher' (the Fisher diagonal weights the fit)")

    def _check_choices(self) -> None:
        from lowra.error_tables import ERROR_TABLES

        if self.codebook not in ("learned", "nf"):
            raise ValueError(f"codebook must be 'learned' or 'nf', got {self.codebook!r}")
        if self.plan not in ("ilp", "uniform"):
            raise ValueError(f"plan must be 'ilp' or 'uniform', got {self.plan!r}")
        if self.error not in ERROR_TABLES:
            raise ValueError(f"quant.error must be one of {ERROR_TABLES}, got {self.error!r}")
        if self.init_codebooks not in ("fixed", "relearn"):
            raise ValueError(f"quant.init_codebooks must be 'fixed' or 'relearn', got {self.init_codebooks!r}")
        low = self.low_bits_init
        if low is not None:
            if not 1.0 < low["below"] <= 4.0:
                raise ValueError(f"quant.low_bits_init.below must lie in (1, 4] code bits, got {low['below']!r}")
            if low["loftq_iters"] < 0:
                raise ValueError(f"quant.low_bits_init.loftq_iters must be >= 0, got {low['loftq_iters']!r}")
            if low["init_codebooks"] not in ("fixed", "relearn"):
                raise ValueError("quant.low_bits_init.init_codebooks must be 'fixed' or 'relearn', got "
                                 f"{low['init_codebooks']!r}")
        if self.budget_kind not in ("nominal", "effective"):
            raise ValueError(f"quant.budget_kind must be 'nominal' or 'effective', got {self.budget_kind!r}")
        if self.budget_scope not in ("model", "matrix"):
            raise ValueError(f"budget_scope must be 'model' or 'matrix', got {self.budget_scope!r}")


#: LowRA options that every method's config carried (and the runner read) before they were nested: another
#: method ignores them at any value, as it always did (old calls and saved dicts that set them still load).
FORMERLY_COMMON = ("codebook_iters", "budget_scope", "measure_windows")
#: What a config of a method without LowRA's options reads for each of them (``LowRAConfig.codebook``
#: of ``method="nf"``, …): the values every such config stored before the options were nested (so the
#: flat ``to_dict()`` and the checkpoints of those configs did not change).
UNUSED_LOWRA_OPTIONS: dict[str, Any] = {**LowRAOptions(error="sse", low_bits_init=None).to_dict()}


# ------------------------------------------------------------------------------------ methods
class Method:
    """One ``LowRAConfig.method``: what the stages ask of it (see the module docstring)."""

    name: str = ""
    #: the class of its own options (``LowRAConfig.method_config``): the fields only this method reads
    options_class: type[MethodOptions] = MethodOptions
    #: the adapter init when a preset does not say (``LowRAConfig.init``)
    default_init: str = LOFTQ_INIT
    #: the base is quantized (False: a dense frozen base, plain LoRA)
    quantizes: bool = True
    #: ``LowRAConfig`` fields whose default depends on the method (left at ``METHOD_DEFAULT``)
    defaults: dict[str, Any] = {"candidates": (1, 2, 4), "init": LOFTQ_INIT}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    @property
    def fields(self) -> tuple[str, ...]:
        """``LowRAConfig`` fields only this method reads (its :attr:`options_class`'s; the runner reads
        them for it only)."""
        return self.options_class.option_names()

    def options(self, values: Mapping[str, Any]) -> MethodOptions:
        """Its options from flat ``LowRAConfig`` keywords (``codebook="nf"``, …) or a saved dict. A LowRA
        option given to another method is accepted only at the value every such config stored
        (:data:`UNUSED_LOWRA_OPTIONS`: old flat dicts load), else a ValueError naming the field and the method;
        :data:`FORMERLY_COMMON` options are ignored for another method at any value, as they always were."""
        values = dict(values)
        if self.options_class is not LowRAOptions:
            for name in [k for k in values if k in UNUSED_LOWRA_OPTIONS]:
                value = values.pop(name)
                if _plain(value) != UNUSED_LOWRA_OPTIONS[name] and name not in FORMERLY_COMMON:
                    raise ValueError(_not_taken(name, value, self.name))
        return self.options_class.from_values(self.name, values)

    # ---- budgets and checks
    def check_bits(self, config: LowRAConfig) -> None:
        """THE check of ``config.bits``: a finite budget in [1, 4] code bits (``budget_kind="effective"``:
        up to 16 stored bits, for methods that plan); an integer unless the method plans precision."""
        bits = config.bits
        if not self.quantizes:
            return
        high = 16.0 if config.budget_kind == "effective" else 4.0
        if not (math.isfinite(bits) and 1.0 <= bits <= high):
            raise ValueError(f"bits: bit budget must lie in [1.0, {high}], got {bits!r}")
        if not self.plans(config) and config.budget_kind == "nominal" and bits != round(bits):
            raise ValueError(self._fractional_message(config))

    def _fractional_message(self, config: LowRAConfig) -> str:
        return (f"method {self.name!r} quantizes every row at one integer width, got bits={config.bits:g}; a "
                "fractional budget needs method='lowra' (per-row precision plan)")

    def check(self, config: LowRAConfig) -> None:
        """Method-specific checks of a config whose common fields are valid (ValueError naming the field)."""
        self.check_bits(config)
        if config.budget_kind == "effective" and not self.plans(config):
            raise ValueError("quant.budget_kind=effective needs method='lowra' with a precision plan (plan='ilp'); "
                             "other methods store one fixed width and report their effective bits as they are")

    # ---- what the stages ask
    def plans(self, config: LowRAConfig) -> bool:
        """Stages 4-5 (codebooks + error tables, one precision plan) run."""
        return False

    def integer_bits(self, config: LowRAConfig) -> int:
        """The one width every row is stored at (methods without a plan)."""
        return int(round(config.bits))

    def candidates(self, config: LowRAConfig) -> tuple[int, ...]:
        return tuple(config.candidates)

    def needs(self, config: LowRAConfig) -> CalibrationNeeds:
        """Calibration statistics this config needs: the calibrated adapter init's Grams here."""
        if not self.quantizes:
            return CalibrationNeeds()
        low = config.low_bits_init["loftq_iters"] if config.low_bits_init and config.rank > 0 else 0
        iters = config.loftq_iters if config.rank > 0 else 0
        init = config.init == CALIBRATED_INIT and max(iters, low) > 0
        return CalibrationNeeds(hessians=init, init=init, why="quant.init=calibrated" if init else "")

    def layer_quantizer(self, config: LowRAConfig, *, bits_per_row: torch.Tensor | None,
                        codebooks: dict[int, torch.Tensor] | None, device: torch.device, backend: str,
                        options: dict[str, Any], importance: torch.Tensor | None = None,
                        relearn: bool = False) -> Callable[[torch.Tensor], QuantizedTensor]:
        """The layer's ``[out, in] → QuantizedTensor`` (quantize + pack) the adapter init calls, widths fixed."""
        raise NotImplementedError(f"method {self.name!r} does not quantize")


class NoQuantization(Method):
    """``method="none"``: a frozen dense base and the standard LoRA init (the LoRA baseline)."""

    name = "none"
    quantizes = False
    default_init = STANDARD_INIT


class QuantizerMethod(Method):
    """A registered quantizer (``lowra.quantizers``: ``nf``, ``uniform``, ``optq``, ...) at one width."""

    def __init__(self, name: str) -> None:
        from lowra.quantizers import get_quantizer

        self.name = name
        self.quantizer = get_quantizer(name)  # an unknown name: ValueError listing the registered ones

    def needs(self, config: LowRAConfig) -> CalibrationNeeds:
        base = super().needs(config)
        if not getattr(self.quantizer, "needs_calibration", False):
            return base
        return CalibrationNeeds(hessians=base.hessians, init=base.init, layer_hessians=True,
                                why=f"method {self.name!r}")

    def check(self, config: LowRAConfig) -> None:
        super().check(config)
        if config.budget_kind == "nominal":
            width = self.integer_bits(config)
            accepted = tuple(getattr(self.quantizer, "accepted_bits", (1, 2, 3, 4)))
            if width not in accepted:
                raise ValueError(f"bits: method {self.name!r} supports {accepted} bits, got {config.bits:g}")

    def layer_quantizer(self, config: LowRAConfig, *, bits_per_row: torch.Tensor | None,
                        codebooks: dict[int, torch.Tensor] | None, device: torch.device, backend: str,
                        options: dict[str, Any], importance: torch.Tensor | None = None,
                        relearn: bool = False) -> Callable[[torch.Tensor], QuantizedTensor]:
        width, quantizer = self.integer_bits(config), self.quantizer
        group_size, double_quant = config.group_size, config.double_quant
        return lambda m: quantizer.quantize(m, width, group_size, double_quant, backend=backend, **options)


class LowRAMethod(Method):
    """``method="lowra"``: learned per-row codebooks, an error table and one precision plan.

    Its own options: :class:`LowRAOptions` (:data:`LOWRA_FIELDS`).
    """

    name = "lowra"
    options_class = LowRAOptions
    default_init = CALIBRATED_INIT
    #: the runner's ``quant=lowra`` (issue 12's measured default): candidates {1, 2, 3, 4}, the calibrated
    #: init (its K-FAC table and low-bit init rule: the defaults of :class:`LowRAOptions`)
    defaults = {"candidates": (1, 2, 3, 4), "init": CALIBRATED_INIT}

    def plans(self, config: LowRAConfig) -> bool:
        return config.plan == "ilp"

    def _fractional_message(self, config: LowRAConfig) -> str:
        return (f"plan='uniform' (use_plan=False) stores every row at one integer width, got a fractional "
                f"budget bits={config.bits:g}; use plan='ilp' (the precision plan) or an integer budget")

    def candidates(self, config: LowRAConfig) -> tuple[int, ...]:
        """The config's candidates; without a plan the integer budget joins them (its codebooks are learned)."""
        candidates = tuple(config.candidates)
        if not self.plans(config) and config.budget_kind == "nominal":
            width = self.integer_bits(config)
            if width not in candidates:
                candidates = tuple(sorted({*candidates, width}))
        return candidates

    def needs(self, config: LowRAConfig) -> CalibrationNeeds:
        base = super().needs(config)
        table = config.error if self.plans(config) and config.error in DATA_TABLES else None
        fisher = table in ("fisher", "measured") or config.fisher_codebooks
        kfac = table == "kfac"
        why = f"quant.error={config.error}" if table or fisher else base.why
        return CalibrationNeeds(fisher=fisher, hessians=base.hessians or kfac, output_grads=kfac,
                                init=base.init, in_memory=table == "measured", why=why)

    def layer_quantizer(self, config: LowRAConfig, *, bits_per_row: torch.Tensor | None,
                        codebooks: dict[int, torch.Tensor] | None, device: torch.device, backend: str,
                        options: dict[str, Any], importance: torch.Tensor | None = None,
                        relearn: bool = False) -> Callable[[torch.Tensor], QuantizedTensor]:
        """Through the registry's ``lowra`` quantizer: the plan's widths and codebooks fixed (``relearn``:
        each call after the first relearns every row's codebook on its argument, at the row's width);
        without a plan one integer width, the codebooks learned on the first call (Fisher-weighted
        with ``importance``) and kept."""
        import torch

        from lowra.codebook import learn_codebooks
        from lowra.quantizers import get_quantizer

        quantizer = get_quantizer(self.name)
        group_size, double_quant = config.group_size, config.double_quant
        iters = 0 if config.codebook == "nf" else config.codebook_iters
        learn = dict(group_size=group_size, iters=iters, weight_power=config.weight_power, double_quant=double_quant)
        if bits_per_row is None:
            width = self.integer_bits(config)
            widths: tuple[int, ...] = (width,)
            tables: dict[int, torch.Tensor] | None = None
            weigh = dict(importance=importance, weigh_codebooks=importance is not None)
        else:
            widths = tuple(sorted(torch.unique(bits_per_row).tolist()))
            tables = {b: codebooks[b].to(device) for b in widths}
            weigh = {}
        planned = None if bits_per_row is None else bits_per_row.to(device)

        def rows(m: torch.Tensor) -> torch.Tensor:
            if planned is not None:
                return planned
            return torch.full((m.shape[0],), widths[0], dtype=torch.int64, device=m.device)

        calls = [0]

        def quantize(m: torch.Tensor) -> QuantizedTensor:
            nonlocal tables
            calls[0] += 1
            if tables is None or (relearn and calls[0] > 1):
                learned = learn_codebooks(m, bits=widths, **learn, **weigh)
                tables = {b: learned.codebooks[b].to(device) for b in widths}
            return quantizer.quantize(m, rows(m), group_size, double_quant, backend=backend, codebooks=tables)

        return quantize


#: The messages of a LowRA option given to another method (the others: :func:`_not_taken`'s own).
_NOT_TAKEN = {
    "error": "quant.error={value!r} is an error table of LowRA's planner; method {method!r} has none",
    "init_codebooks": ("quant.init_codebooks=relearn needs method='lowra' with learned codebooks "
                       "(got method={method!r})"),
    "low_bits_init": "quant.low_bits_init needs method='lowra', got method={method!r}",
}


def _not_taken(name: str, value: Any, method: str) -> str:
    why = _NOT_TAKEN.get(name, "{name} is a LowRA option; method={method!r} does not take it (got {name}={value!r})")
    return why.format(name=name, value=value, method=method)


def _plain(value: Any) -> Any:
    """``value`` as its JSON form would read (tuples as lists, numbers compared by value)."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


#: LowRA's own fields (the runner reads ``quant.<field>`` for ``quant.method=lowra`` only).
LOWRA_FIELDS = LowRAOptions.option_names()
_BUILTIN: dict[str, Method] = {"none": NoQuantization(), "lowra": LowRAMethod()}


def unstreamable(config: LowRAConfig) -> str | None:
    """None when ``lowra.quantize_pretrained`` can run ``config``, else why not: a dense base has
    nothing to stream, ``error=measured`` needs the whole model (statistics are collected block by
    block, :mod:`lowra.blockwise`, so every other config streams)."""
    method = config.method_object
    if not method.quantizes:
        return (f"method={method.name!r} keeps the dense bases: there is nothing to stream-quantize; load the "
                "model with from_pretrained and use lowra.quantize_model")
    if method.needs(config).in_memory:
        return (f"quant.error={config.error} measures the loss of the whole model once per layer and width; use "
                "lowra.quantize_model on the loaded model")
    return None


def method_of(name: str) -> Method:
    """The :class:`Method` of ``LowRAConfig.method`` ``name`` (``none``, ``lowra`` or a registered quantizer).

    Raises ValueError naming the registered methods for an unknown name.
    """
    if name in _BUILTIN:
        return _BUILTIN[name]
    from lowra.quantizers import QUANTIZERS

    if name not in QUANTIZERS:
        raise ValueError(f"unknown quantization method {name!r}; choose one of {method_names()}")
    return QuantizerMethod(name)


def method_names() -> list[str]:
    """Every ``LowRAConfig.method``: ``none``, ``lowra`` and the registered quantizers, sorted."""
    from lowra.quantizers import QUANTIZERS

    return sorted({*_BUILTIN, *QUANTIZERS})


# ------------------------------------------------------------------------------------ presets
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
    def method(self) -> Method:
        """The :class:`Method` this preset runs (``LowRAConfig.method = quantizer``)."""
        return method_of(self.quantizer)

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
