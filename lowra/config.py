"""``LowRAConfig``: every quantization and adapter option of ``quantize_model`` in one validated object.

As PEFT's ``LoraConfig`` or transformers' ``BitsAndBytesConfig``: a dataclass checked on
construction (a bad value is a ValueError that names the field), ``to_dict()`` / ``from_dict()``
JSON-safe and strict (unknown keys are an error naming them), stored in every checkpoint
(``lowra.save_quantized``: the manifest's ``lowra_config``) and in the runner's ``results.json``.
``to_dict()`` carries ``quant_method: "lowra"``: it is the ``quantization_config`` of a Hugging
Face ``config.json`` as it stands.

Common fields + the method's own options (as PEFT's ``LoraConfig`` + ``LoftQConfig``):
``method_config`` is an object of the method's ``Method.options_class`` (:class:`~lowra.methods.LowRAOptions`
for ``method="lowra"``: codebooks, plan, error table, low-bit init; the empty
:class:`~lowra.methods.MethodOptions` for the others). The flat keyword form builds it
(``LowRAConfig(bits=2, codebook="nf")``) and ``config.codebook`` reads it (for a method without the
option: the value such configs always stored); an option the method does not take is a ValueError
naming the field and the method. ``to_dict()`` stays flat (:data:`FLAT_KEYS`), as checkpoints stored
it before the nesting; ``from_dict`` also reads a nested ``method_config``.

``quantize_model(model, config)`` takes it; ``quantize_model(model, bits, rank=..., ...)`` stays as
a shortcut that builds one (:func:`config_from_arguments`).  What is data or a runtime choice of
one call, not configuration, stays an argument of ``quantize_model``: ``calibration`` windows,
``layer_options`` (per-layer tensors such as OPTQ Hessians), ``backend``, ``progress``.

The Hydra groups map onto it one to one (:meth:`LowRAConfig.from_hydra`, table
:data:`HYDRA_KEYS`): ``quant.<field>`` for the quantization fields, ``lora.rank|alpha|dropout``,
``model.target_modules``, ``quant.keep_full_precision`` → ``skip_modules``,
``quant.options.calibration.batch_size`` → ``calibration_batch_size`` and the other
``quant.options`` → ``quant_options`` (``quant.options.<field>``, e.g. ``measure_windows``, still
sets that field, as ``quant.options`` were always extra keyword arguments of ``quantize_model``).
Fields a preset does not set (``budget_scope``, ``codebook_iters``, ``plan_options``, ...) keep
their defaults and can be added on the command line (``+quant.budget_scope=matrix``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from lowra.config_values import (
    LOW_BITS_INIT_KEYS,  # noqa: F401 (its old home: lowra.config.LOW_BITS_INIT_KEYS)
    integer,
    json_safe,
    names,
    number,
    string,
)
from lowra.methods import INIT_FIELDS as METHOD_INIT_FIELDS
from lowra.methods import (
    LOWRA_FIELDS,
    METHOD_DEFAULT,
    UNUSED_LOWRA_OPTIONS,
    LowRAOptions,
    Method,
    MethodOptions,
    method_of,
)

__all__ = ["HYDRA_KEYS", "PAPER", "LowRAConfig", "LowRAOptions", "MethodOptions", "config_from_arguments"]

#: ``LowRAConfig.to_dict()["quant_method"]``: the name of this quantization scheme in HF configs.
QUANT_METHOD = "lowra"
#: Options of ``lowra.precision.assign_precision`` that ``plan_options`` may set (the others are
#: given by ``quantize_model``); checked against its signature by the tests.
PLAN_OPTIONS = ("clusters", "seed", "samples", "time_limit", "mip_rel_gap", "max_nodes", "threads", "solver_options",
                "kmeans_iters", "kmeans_sample", "stage2", "verbose")
_WIDTHS = (1, 2, 3, 4)
_DTYPES = ("float32", "float16", "bfloat16", "float64")
#: LowRA-only fields: the runner reads them from ``quant.*`` for ``quant.method=lowra`` only (the
#: other presets list them as "unused").
LOWRA_ONLY = LOWRA_FIELDS
#: The paper's preset (conf/quant/lowra_paper.yaml) as ``LowRAConfig`` fields: data-free weight-SSE plan
#: over {1, 2, 4} bits, LoftQ init — ``LowRAConfig(bits=2, **PAPER)``.
PAPER = {"candidates": (1, 2, 4), "error": "sse", "init": "loftq", "low_bits_init": None}
#: ``LowRAConfig.to_dict()``'s keys in their order: the flat form every checkpoint stored before the
#: method's options were nested (``method_config``), kept so that saved files and fingerprints do not change.
FLAT_KEYS = ("bits", "method", "group_size", "double_quant", "candidates", "codebook", "codebook_iters", "weight_power",
             "plan", "budget_scope", "budget_kind", "error", "fisher_codebooks", "measure_windows",
             "calibration_batch_size", "plan_options", "quant_options", "rank", "alpha", "dropout", "loftq_iters",
             "init", "init_damp", "init_codebooks", "low_bits_init", "target_modules", "skip_modules", "adapter_dtype")
#: Adapter-init fields: read for every quantizing method (not for ``method=none``).
INIT_FIELDS = METHOD_INIT_FIELDS


@dataclasses.dataclass
class LowRAConfig:
    """Every option of LowRA's ``quantize_model``: the quantizer, the precision plan, the adapters.

    Quantization:
        bits: average code-bit budget in [1, 4] (``budget_kind="effective"``: stored bits, up to
            16); fractional only with ``method="lowra"`` and a plan; ignored by ``method="none"``.
        method: ``"lowra"`` (learned per-row codebooks + precision plan), ``"nf"`` (NormalFloat,
            QLoRA/LoftQ), ``"uniform"``, ``"optq"``, another registered quantizer, or ``"none"`` (a
            frozen dense base: plain LoRA).
        group_size, double_quant: absmax grouping along the input dim and its storage (fp16, or
            8-bit double-quantized as in QLoRA).
        candidates: widths a row may get (LowRA; the paper: ``(1, 2, 4)``), each in 1..4.
        codebook: LowRA ablation: ``"learned"`` (per-row Lloyd-Max codebooks) or ``"nf"`` (the
            NormalFloat start of ``learn_codebooks(iters=0)``, symmetric ±m at 1 bit) for both the
            planner's error tables and the stored tables; the plan stays on.
        codebook_iters, weight_power: Lloyd-Max iterations and element weight ``absmax**p``.
        plan: ``"ilp"`` (precision plan; it also runs at an integer budget and may mix widths) or
            ``"uniform"`` (every row at the integer budget with its learned codebook; a fractional
            budget is then a ValueError).
        budget_scope: ``"model"`` (one budget over all layers) or ``"matrix"`` (one per layer).
        budget_kind: ``"nominal"``: ``bits`` counts code bits (QLoRA/LoftQ convention);
            ``"effective"`` (``method="lowra"`` with a plan): ``bits`` counts every stored bit —
            each row's cost in the plan includes its codes, codebook, scales and row index
            (``lowra.format.row_storage_bits``); budgets up to 16 are accepted, and one the
            cheapest plan cannot meet is a ValueError.
        error: the planner's error table (``method="lowra"``; ``lowra.error_tables``):
            ``"sse"`` (the paper's data-free weight SSE), ``"fisher"`` (diagonal empirical Fisher
            ``Σⱼ Fᵢⱼ ΔWᵢⱼ²`` from calibration), ``"relative"`` (data-free: each layer's SSE
            divided by its mean squared weight, so layers of small norm are not starved),
            ``"kfac"`` (``Gᵢ ΔWᵢ H ΔWᵢᵀ``, Kronecker-factored Fisher from calibration),
            ``"measured"`` (each layer's loss increase measured on the first ``measure_windows``
            calibration windows with that layer alone quantized, split among its rows by their
            Fisher row errors).
        fisher_codebooks: with ``error="fisher"``, fit the Lloyd-Max codebooks to the
            Fisher-weighted error as well (else the codebooks stay data-free).
        measure_windows: calibration windows ``error="measured"`` runs per layer and width.
        calibration_batch_size: windows per forward/backward chunk of the calibration pass.
        plan_options: options of ``lowra.precision.assign_precision`` (``clusters``, ``samples``,
            ``time_limit``, ...; :data:`PLAN_OPTIONS`).
        quant_options: JSON-safe options of another method's quantizer (OPTQ ``damp``, ...).
        method_config: the method's own options (the LowRA-only fields above, from ``codebook`` to
            ``measure_windows``, and ``init_codebooks``, ``low_bits_init`` below, live in its
            :class:`~lowra.methods.LowRAOptions`); given flat, they are gathered into it.
    Adapters:
        rank, alpha, dropout: LoRA rank r (0: none), alpha (scale ``alpha / r``), input dropout.
        loftq_iters: alternations of the adapter init (0: standard LoRA init, B = 0).
        init: ``"loftq"`` (rank-r SVD of the residual, the paper) or ``"calibrated"`` (the same in
            the activation norm ``‖(W − deq(Q) − s·BA)X‖``, ``H = XᵀX`` from calibration;
            ``lowra.adapter_init.ActivationWhitening``); ``loftq_iters`` alternations either way.
        init_damp: relative damping of the input Gram for ``init="calibrated"``.
        init_codebooks: ``"fixed"`` (the paper: each re-quantization of ``W − s·BA`` in the init's
            alternations keeps the codebooks learned on ``W``) or ``"relearn"`` (each one relearns every
            row's codebook on ``W − s·BA`` at the row's planned width; learned codebooks only; it acts
            only from the second alternation, so ``loftq_iters ≥ 2``).
        low_bits_init: None, or ``{"below": b, "loftq_iters": T, "init_codebooks": c}``: when the
            code-bit budget (``bits``; with ``budget_kind="effective"`` the plan's parameter-weighted
            mean code width) is below ``b`` bits, the init runs with ``T`` alternations and codebooks ``c`` instead of
            ``loftq_iters`` / ``init_codebooks`` (``method="lowra"``; with ``codebook="nf"`` the
            NormalFloat tables are not learned, so they stay fixed; measured in issue 12: more
            alternations with relearned codebooks help below 2 bits, not at 2 bits).
        target_modules: PEFT semantics (names / suffixes, or one full-match regex); None: the
            model type's projections (``lowra.model_layers.DEFAULT_TARGET_MODULES``).
        skip_modules: never quantized unless targeted explicitly (Hydra: ``keep_full_precision``).
        adapter_dtype: dtype name of A/B (``"bfloat16"``, ...); None: fp32 on CPU, bf16 on GPU.
    """

    bits: float = 2.0
    method: str = "lowra"
    group_size: int = 64
    double_quant: bool = False
    candidates: tuple[int, ...] = METHOD_DEFAULT  # type: ignore[assignment]
    calibration_batch_size: int = 4
    plan_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    quant_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    loftq_iters: int = 1
    init: str = METHOD_DEFAULT  # type: ignore[assignment]
    init_damp: float = 0.01
    target_modules: str | tuple[str, ...] | None = None
    skip_modules: tuple[str, ...] = ("lm_head",)
    adapter_dtype: str | None = None
    #: the method's own options (``Method.options_class``: :class:`~lowra.methods.LowRAOptions` for
    #: ``method="lowra"``, an empty :class:`~lowra.methods.MethodOptions` otherwise), or a mapping of them
    method_config: MethodOptions | Mapping[str, Any] | None = None

    def __init__(self, *args: Any, **values: Any) -> None:
        """The fields above by keyword (``bits`` and ``method`` also by position); the method's own
        options either as ``method_config`` or flat (``LowRAConfig(bits=2, codebook="nf")``), flat ones
        over ``method_config``'s."""
        fields = dataclasses.fields(self)
        if len(args) > 2:
            raise TypeError(f"LowRAConfig takes at most 2 positional arguments (bits, method), got {len(args)}")
        for f, value in zip(fields, args, strict=False):
            if f.name in values:
                raise TypeError(f"LowRAConfig got multiple values for argument {f.name!r}")
            values[f.name] = value
        own = {k: values.pop(k) for k in list(values) if k in LOWRA_FIELDS and values[k] is not METHOD_DEFAULT}
        for k in [k for k in values if k in LOWRA_FIELDS]:
            values.pop(k)  # METHOD_DEFAULT: the option's default
        unknown = sorted(set(values) - {f.name for f in fields})
        if unknown:
            raise TypeError(f"LowRAConfig got an unexpected keyword argument {unknown[0]!r}")
        for f in fields:
            if f.name in values:
                value = values[f.name]
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                value = f.default
            setattr(self, f.name, value)
        self._flat_options = own
        self.__post_init__()

    def __post_init__(self) -> None:
        self._normalise_types()
        self._check_values()

    # ------------------------------------------------------------------------- validation
    def _normalise_types(self) -> None:
        """Plain Python types (so ``to_dict`` is JSON-safe and equal configs compare equal); fields
        left at ``METHOD_DEFAULT`` take the method's default (``lowra.methods.Method.defaults``);
        ``method_config`` becomes the method's options object."""
        self.method = string("method", self.method)
        for name, value in method_of(self.method).defaults.items():
            if getattr(self, name) is METHOD_DEFAULT:
                setattr(self, name, copy.deepcopy(value))
        self.method_config = self._method_options(self.__dict__.pop("_flat_options", {}))
        self.bits = number("bits", self.bits)
        for name in ("group_size", "calibration_batch_size", "rank", "loftq_iters"):
            setattr(self, name, integer(name, getattr(self, name)))
        for name in ("alpha", "dropout", "init_damp"):
            setattr(self, name, number(name, getattr(self, name)))
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant must be true or false, got {self.double_quant!r}")
        self.init = string("init", self.init)
        if isinstance(self.candidates, (str, bytes)) or not hasattr(self.candidates, "__iter__"):
            raise ValueError(f"candidates must be a sequence of bit-widths, got {self.candidates!r}")
        self.candidates = tuple(integer("candidates", b) for b in self.candidates)
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            self.target_modules = names("target_modules", self.target_modules)
        self.skip_modules = names("skip_modules", self.skip_modules)
        if self.adapter_dtype is not None:
            name = str(self.adapter_dtype).removeprefix("torch.")
            if name not in _DTYPES:
                raise ValueError(f"adapter_dtype must be one of {_DTYPES} or None, got {self.adapter_dtype!r}")
            self.adapter_dtype = name
        for name in ("plan_options", "quant_options"):
            setattr(self, name, _json_options(name, getattr(self, name)))

    def _method_options(self, flat: dict[str, Any]) -> MethodOptions:
        """``method_config`` (None, an options object or a mapping) with the flat options over it, as
        the method's options class (a LowRA option another method does not take: ValueError naming both)."""
        method, given = method_of(self.method), self.method_config
        if type(given) is method.options_class and not flat:
            return copy.deepcopy(given)
        if given is None:
            values: dict[str, Any] = {}
        elif isinstance(given, MethodOptions):
            values = given.to_dict()
        elif isinstance(given, Mapping):
            values = {str(k): v for k, v in given.items()}
        else:
            raise ValueError(f"method_config must be a {method.options_class.__name__} or a mapping, got "
                             f"{type(given).__name__}")
        return method.options({**values, **flat})

    def _check_values(self) -> None:
        from lowra.error_tables import INITS

        if self.init not in INITS:
            raise ValueError(f"quant.init must be one of {INITS}, got {self.init!r}")
        if not self.candidates or any(b not in _WIDTHS for b in self.candidates) or \
                len(set(self.candidates)) != len(self.candidates):
            raise ValueError(f"candidates must be distinct widths from {_WIDTHS}, got {self.candidates!r}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")
        if self.loftq_iters < 0:
            raise ValueError(f"loftq_iters must be a non-negative integer, got {self.loftq_iters!r}")
        if self.calibration_batch_size < 1:
            raise ValueError(f"calibration_batch_size must be a positive integer, got {self.calibration_batch_size!r}")
        if self.rank < 0:
            raise ValueError(f"rank must be a non-negative integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}")
        if not self.init_damp >= 0:
            raise ValueError(f"init_damp must be >= 0, got {self.init_damp!r}")
        unknown = sorted(set(self.plan_options) - set(PLAN_OPTIONS))
        if unknown:
            raise ValueError(f"plan_options: unknown option(s) {unknown} of assign_precision; allowed: "
                             f"{list(PLAN_OPTIONS)}")
        self.method_object.check(self)  # the method's own fields and the budget (lowra.methods)

    @property
    def method_object(self) -> Method:
        """The :class:`~lowra.methods.Method` of ``method`` (what it plans, needs and quantizes with)."""
        return method_of(self.method)

    def option(self, name: str) -> Any:
        """LowRA option ``name`` as the stages read it: the method's own value, else (a method without
        it) the value such configs always stored (:data:`lowra.methods.UNUSED_LOWRA_OPTIONS`)."""
        if name in type(self.method_config).option_names():
            return getattr(self.method_config, name)
        return copy.deepcopy(UNUSED_LOWRA_OPTIONS[name])

    # ------------------------------------------------------------------------ serialisation
    def field_values(self) -> dict[str, Any]:
        """Every option by its flat name (:data:`FLAT_KEYS`: the common fields and LowRA's options,
        read with :meth:`option`), as Python values."""
        return {k: self.option(k) if k in LOWRA_FIELDS else getattr(self, k) for k in FLAT_KEYS}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe flat dict of every option (tuples as lists) plus ``quant_method: "lowra"``.

        This is the ``quantization_config`` of a Hugging Face ``config.json``;
        ``LowRAConfig.from_dict(config.to_dict()) == config``. It stays flat (:data:`FLAT_KEYS`, the
        method's options among the common fields) so that checkpoints and the streamed run's resume
        fingerprint are those of before the options were nested; :meth:`from_dict` also reads a
        nested ``method_config``.
        """
        out: dict[str, Any] = {"quant_method": QUANT_METHOD}
        for name, value in self.field_values().items():
            out[name] = list(value) if isinstance(value, tuple) else json.loads(json.dumps(value))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LowRAConfig:
        """The config of ``to_dict()`` output (e.g. a ``quantization_config``; flat, or with a nested
        ``method_config``); unknown keys are a ValueError naming them, a ``quant_method`` other than
        ``"lowra"`` too. A saved dict of another method may carry any value of
        ``lowra.methods.FORMERLY_COMMON`` (that method never read them): they are ignored."""
        if not isinstance(data, Mapping):
            raise ValueError(f"LowRAConfig.from_dict needs a mapping, got {type(data).__name__}")
        data = dict(data)
        qm = data.pop("quant_method", QUANT_METHOD)
        if qm != QUANT_METHOD:
            raise ValueError(f"quant_method must be {QUANT_METHOD!r} for a LowRAConfig, got {qm!r}")
        known = {f.name for f in dataclasses.fields(cls)} | set(LOWRA_FIELDS)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"LowRAConfig.from_dict: unknown key(s) {unknown}; known: {sorted(known)}")
        if "bits" not in data:
            raise ValueError("LowRAConfig.from_dict: 'bits' is required")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_hydra(cls, cfg: Any) -> LowRAConfig:
        """The config of a composed runner config (``conf/run.yaml``: groups ``quant``, ``lora``, ``model``).

        Every field comes from its Hydra key (:data:`HYDRA_KEYS`) when present; LowRA-only keys
        (:data:`LOWRA_ONLY`) are read for ``quant.method=lowra`` only and the adapter-init keys
        for quantizing methods only, as the presets mark them ("unused").
        """
        q = _plain(cfg["quant"])
        method = str(q["method"])
        options = dict(q.get("options") or {})
        calibration = options.pop("calibration", None) or {}
        values: dict[str, Any] = {}
        own = method_of(method)  # the fields only it reads; the init fields for quantizing methods only
        for field, key in HYDRA_KEYS.items():
            if field in LOWRA_ONLY and field not in own.fields or field in INIT_FIELDS and not own.quantizes:
                continue
            group, _, rest = key.partition(".")
            if group == "quant" and rest == "options":
                values[field] = options
                continue
            if rest == "options.calibration.batch_size":
                if "batch_size" in calibration:
                    values[field] = calibration["batch_size"]
                continue
            source = q if group == "quant" else _plain(cfg[group])
            # null keeps a field's default, except low_bits_init, where null means "no low-bit rule"
            # (its default depends on the method)
            if rest in source and (source[rest] is not None or field == "low_bits_init") or field in ("bits", "method"):
                values[field] = source[rest]
        # ``quant.options`` are extra keyword arguments of quantize_model: a field's name sets the
        # field (``+quant.options.measure_windows=4``), the rest are the quantizer's options
        names = {f.name for f in dataclasses.fields(cls)} | set(LOWRA_FIELDS)
        for key in [k for k in options if k in names]:
            if key in values and key != "quant_options" and _hydra_set(q, key):
                raise ValueError(f"{key} is set twice: quant.{key} and quant.options.{key}")
            values[key] = options.pop(key)
        return cls(**values)


def _option_property(name: str) -> property:
    return property(lambda self: self.option(name), doc=f"LowRA option ``{name}`` (:meth:`LowRAConfig.option`).")


for _name in LOWRA_FIELDS:  # config.codebook, config.error, ...: read through the method's options
    setattr(LowRAConfig, _name, _option_property(_name))
del _name


#: ``LowRAConfig`` field → the key of the composed Hydra config that sets it (one to one).
HYDRA_KEYS: dict[str, str] = {
    **{f: f"quant.{f}" for f in (
        "bits", "method", "group_size", "double_quant", "candidates", "codebook", "codebook_iters", "weight_power",
        "plan", "budget_scope", "budget_kind", "error", "fisher_codebooks", "measure_windows", "plan_options",
        "loftq_iters", "init", "init_damp", "init_codebooks", "low_bits_init", "adapter_dtype")},
    "calibration_batch_size": "quant.options.calibration.batch_size",
    "quant_options": "quant.options",
    "rank": "lora.rank",
    "alpha": "lora.alpha",
    "dropout": "lora.dropout",
    "target_modules": "model.target_modules",
    "skip_modules": "quant.keep_full_precision",
}


def config_from_arguments(config: LowRAConfig | Mapping[str, Any] | float | None,
                          options: dict[str, Any]) -> tuple[LowRAConfig, dict[str, Any]]:
    """``quantize_model``'s shortcut: its ``config`` argument and keyword options as one config.

    ``config``: a ``LowRAConfig`` (keyword options then override fields, as
    ``dataclasses.replace``), its ``to_dict()`` form, or the budget ``bits`` (the old positional
    form).  ``use_plan=False`` means ``plan="uniform"``.  Keywords that are not fields are options
    of the method's quantizer (``damp=`` for OPTQ): JSON values join ``quant_options``; others
    (tensors such as ``hessian=``) are data of this call, returned separately, never stored.
    Returns ``(config, runtime quantizer options)``.
    """
    options = dict(options)
    names = {f.name for f in dataclasses.fields(LowRAConfig)} | set(LOWRA_FIELDS)
    if "use_plan" in options and not options.pop("use_plan"):
        options["plan"] = "uniform"
    fields = {k: options.pop(k) for k in list(options) if k in names}
    extra_json = {k: v for k, v in options.items() if json_safe(v)}
    runtime = {k: v for k, v in options.items() if k not in extra_json}
    if isinstance(config, LowRAConfig):
        base = config
    elif isinstance(config, Mapping):
        base = LowRAConfig.from_dict(config)
    elif config is None:
        base = None  # LowRAConfig(): the runner's default (quant=lowra), with the fields given
    else:
        if "bits" in fields:
            raise ValueError("quantize_model got the budget twice: positionally and as bits=")
        fields["bits"] = config
        base = None
    if extra_json:
        quant_options = dict(fields.get("quant_options", base.quant_options if base is not None else {}))
        quant_options.update(extra_json)
        fields["quant_options"] = quant_options
    result = LowRAConfig(**fields) if base is None else dataclasses.replace(base, **fields)
    return result, runtime


# ---------------------------------------------------------------------------------- helpers
def _plain(node: Any) -> Any:
    """An OmegaConf node as plain containers (resolved); anything else unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - the runner always has omegaconf
        return node
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _hydra_set(q: Mapping[str, Any], key: str) -> bool:
    return key in q and q[key] is not None


def _json_options(name: str, value: Any) -> dict[str, Any]:
    """``plan_options`` / ``quant_options`` as a dict of JSON values (None: empty)."""
    value = {} if value is None else value
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a mapping, got {type(value).__name__}")
    value = {str(k): v for k, v in value.items()}
    bad = [k for k, v in value.items() if not json_safe(v)]
    if bad:
        raise ValueError(f"{name} must hold JSON values (numbers, strings, lists, dicts): {bad} do not "
                         "(tensors such as a layer's hessian= are data: pass them to quantize_model)")
    return value
