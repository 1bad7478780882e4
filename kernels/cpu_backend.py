"""The CPU backend: ``dequantize`` and the LUT matmul (forward and backward) at memory speed.

On a CPU tensor, ``backend="auto"`` (or ``"cpu"``) runs these instead of the PyTorch references.
They are a small C++ extension (``kernels/cpu_backend.cpp``) built on first use with the machine's
C++ compiler (``torch.utils.cpp_extension.load``; AVX2/FMA when the CPU has it) and cached by torch
under ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) under a name keyed by the source's
hash: the build (about a minute on 2 cores) is paid once per machine and source version, for every shape,
whatever other checkouts share the cache. Work is split over ``torch.get_num_threads()`` threads: with
``at::parallel_for`` (OpenMP), except the forward GEMV, whose row chunks are claimed from a small pool of the
extension's own threads (``ClaimPool`` in the C++: the caller never waits at a barrier for a descheduled
thread, so on a loaded machine 2 threads cost at worst about one thread's time instead of a scheduler slice
per call). The extension also registers ``lowra::lut_linear``'s CPU kernel (C++, no Python per call under
``torch.compile``; ``kernels/lut_linear.py``). Where no compiler works, one ``RuntimeWarning`` says so
and the references run (slow, never silently).

Why a C++ extension (measured on the 2-core AMD EPYC, one thread, 2048×2048 at 2 bits): the
reference dequantize took 105 ms, the same reference compiled by ``torch.compile`` (inductor C++)
26 ms after a 27 s compile *per shape* — still 9× an fp16→fp32 conversion of the matrix (2.9 ms) —
because inductor lowers the per-row codebook lookup to a scalar gather and the row scatter to an
``index_put``. The extension keeps each row's ≤16-entry fp32 codebook in two AVX2 registers
(``vpermps`` lookup), shifts 8 codes out of one packed word per instruction, and reaches the
conversion's speed (``python -m experiments.bench.kernels --cpu-ratios`` for the numbers).

Regimes (``GEMV_MAX_M`` = 16, fp32 activations):

* ``lut_matmul_cpu``, M ≤ 16: fused GEMV — each row is dequantized in 512-input blocks into an
  L1 buffer and dotted with the ``M`` activation rows; ``deq(W)`` never exists in memory.
* ``lut_matmul_cpu``, M > 16 (or fp16/bf16 activations): ``deq(W)`` is written once as a transient
  in the activation dtype by the fast dequantize and multiplied by BLAS (``x @ wᵀ``), exactly the
  reference's computation, so the result is bit-exact with ``lut_matmul_ref``.
* ``lut_matmul_backward_cpu``: the same split (fused ``gx += gy[:, rows] · W`` over input-column
  blocks for M ≤ 16; transient + BLAS otherwise, bit-exact with ``lut_matmul_backward_ref``).

``dequantize_cpu`` is bit-exact with ``dequantize_ref`` for every output dtype (fp32 product,
rounded once). The fused M ≤ 16 products are *not* bit-exact with BLAS (its summation order is
unspecified); they are tested against an fp64 product at fp32 accuracy.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowra_kernels.layout import codes_per_word
from lowra_kernels.weight import PackedWeight, WeightCache, check_packed

GEMV_MAX_M = 16  # forward/backward rows M up to this run fused, larger M dequantize + BLAS
# Weights per thread of the forward GEMV before a further thread is used (read at each call of the Python
# path; lowra::lut_linear's C++ kernel takes its value when it is registered; the decode benchmark's
# --gemv-grain sets it). A layer's output rows are split into ~8 chunks per thread that the caller and the
# pool's helpers claim (LayerPlan, ClaimPool), so 64K weights (≈ 10 µs of one thread's work at 2 bits) splits
# every SmolLM2 layer over 2 threads but SmolLM2's k/v projections (110K weights).
GEMV_GRAIN = 1 << 16
_SOURCE = Path(__file__).with_name("cpu_backend.cpp")
_TABLE = 16  # padded codebook row in the extension

_lock = threading.Lock()
_on_ready: list = []  # callables run with the extension once it has loaded (kernels/lut_linear.py's C++ op kernel)
_ext: Any = None
_state = "unloaded"  # "unloaded" | "ready" | "failed"
_failure = ""


def _build_flags() -> tuple[str, list[str]]:
    """Extension name and compiler flags (AVX2/FMA only where the CPU reports it).

    The name carries a hash of the source, the flags and the torch version: torch's extension cache
    (``$TORCH_EXTENSIONS_DIR``) is shared by every checkout and installed wheel on the machine, and
    keeps one build per name, so two checkouts with different sources under one name rebuilt each
    other's extension on every run. Keyed by content, each source builds once per machine.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    simd = capability in ("AVX2", "AVX512")
    flags = ["-O3", "-fopenmp"] + (["-mavx2", "-mfma", "-mf16c"] if simd else [])
    if os.environ.get("LOWRA_CPU_SANITIZE") == "1":  # AddressSanitizer build (run with libasan preloaded)
        flags += ["-g", "-fsanitize=address", "-fno-omit-frame-pointer"]
    key = hashlib.sha256(_SOURCE.read_bytes())
    key.update(" ".join(flags).encode())
    key.update(torch.__version__.encode())
    return f"lowra_cpu_{'avx2' if simd else 'generic'}_{key.hexdigest()[:16]}", flags


STALE_LOCK_S = 600.0  # a build takes 10-40 s here; a lock this old was left by a killed build


def clear_stale_lock(build_dir: Path, max_age_s: float = STALE_LOCK_S) -> bool:
    """Remove ``build_dir/lock`` when it is older than ``max_age_s``; True if removed.

    torch's ``cpp_extension.load`` guards a build with a lock file and waits forever while it exists;
    a build killed mid-way (Ctrl-C, SIGKILL, a timeout) leaves it behind, and every later process
    would hang in ``load`` without a word.
    """
    lock = Path(build_dir) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age <= max_age_s:
        return False
    warnings.warn(f"removing a stale build lock ({age:.0f} s old, left by a killed build): {lock}",
                  RuntimeWarning, stacklevel=2)
    lock.unlink(missing_ok=True)
    return True


def extension() -> Any | None:
    """The compiled extension module, building it on first call; ``None`` (warned once) if it fails."""
    global _ext, _state, _failure
    if _state == "ready":
        return _ext
    if _state == "failed":
        return None
    with _lock:
        if _state == "unloaded":
            name, flags = _build_flags()
            try:
                from torch.utils.cpp_extension import _get_build_directory, load

                clear_stale_lock(Path(_get_build_directory(name, verbose=False)))
                _ext = load(name=name, sources=[str(_SOURCE)], extra_cflags=flags,
                            extra_ldflags=["-fopenmp"] + [f for f in flags if f.startswith("-fsanitize")],
                            verbose=False)
                _state = "ready"
                for hook in _on_ready:
                    hook(_ext)
            except Exception as err:  # any build failure means: no fast path
                _state, _failure = "failed", f"{type(err).__name__}: {str(err).strip()[-600:]}"
                warnings.warn(
                    "LowRA CPU kernels could not be built, so dequantize and the LUT matmul run the "
                    f"slow PyTorch reference on CPU (10-100x slower). Cause: {_failure}",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _ext if _state == "ready" else None


def when_ready(hook) -> None:
    """Run ``hook(extension)`` once the extension has loaded (now, if it has; never, if it fails to build)."""
    _on_ready.append(hook)
    if _state == "ready" and not isinstance(_ext, _NoLaunch):
        hook(_ext)


def available() -> bool:
    """Whether the CPU extension is (or can be) built on this machine."""
    return extension() is not None


def failure() -> str:
    """Why the build failed ('' when it did not, or was not tried yet)."""
    return _failure


def _require() -> Any:
    ext = extension()
    if ext is None:
        raise RuntimeError(f"backend='cpu' needs the LowRA CPU extension, which failed to build: {_failure}")
    return ext


def _table(codebook: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 ``[n or 1, 16]`` codebook rows, repeated (the extension reads 16 entries per row).

    Entry ``j`` holds value ``j mod 2**b``: the AVX2 lookup indexes with the low 3 bits of a
    shifted word without masking off the next code's bits, which the repetition makes harmless.
    """
    reps = _TABLE >> bits
    return codebook.to(torch.float32).repeat(1, reps).contiguous()


_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def _group_args(codes: torch.Tensor, rows: torch.Tensor, table: torch.Tensor, absmax: torch.Tensor,
                bits: int, group_size: int, in_features: int) -> tuple:
    """The extension's group arguments (raw pointers of contiguous tensors the caller keeps alive)."""
    return (codes.data_ptr(), codes.shape[0], codes.shape[1], rows.data_ptr(), table.data_ptr(),
            table.shape[0] == 1, absmax.data_ptr(), absmax.dtype == torch.float16, absmax.shape[1], bits,
            group_size, in_features)


def _scales(absmax: torch.Tensor) -> torch.Tensor:
    """absmax as the extension reads it: fp16 (the stored form, converted exactly per group) or fp32."""
    if absmax.dtype not in (torch.float16, torch.float32):
        absmax = absmax.to(torch.float32)
    return absmax.contiguous()


def _check_group(codes: torch.Tensor, codebook: torch.Tensor, absmax: torch.Tensor, bits: int,
                 group_size: int, in_features: int, rows_out: int) -> None:
    per_word = codes_per_word(bits)
    n = codes.shape[0]
    if codes.dim() != 2 or codes.dtype != torch.int32:
        raise ValueError(f"codes must be int32 [rows, words], got {codes.dtype} {tuple(codes.shape)}")
    if codes.shape[1] * per_word < in_features:
        raise ValueError(f"{codes.shape[1]} words per row cannot hold {in_features} {bits}-bit codes")
    if codebook.dim() != 2 or codebook.shape[-1] != 1 << bits or codebook.shape[0] not in (1, n):
        raise ValueError(f"codebook must be [{n} or 1, {1 << bits}], got {tuple(codebook.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    groups = (in_features + group_size - 1) // group_size
    if absmax.dim() != 2 or absmax.shape[0] != rows_out or absmax.shape[1] < groups:
        raise ValueError(f"absmax must be [{rows_out}, {groups}], got {tuple(absmax.shape)}")


def dequantize_cpu(
    codes: torch.Tensor,
    rows: torch.Tensor,
    codebook: torch.Tensor,
    absmax: torch.Tensor,
    bits: int,
    group_size: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """``lowra_kernels.dequantize.dequantize_ref`` on CPU, bit-exact (same arguments, writes ``out``)."""
    ext = _require()
    if codes.shape[0] == 0:
        return out
    if out.dim() != 2 or not out.is_floating_point():
        raise ValueError(f"out must be a 2-D float tensor, got {out.dtype} {tuple(out.shape)}")
    _check_group(codes, codebook, absmax, bits, group_size, out.shape[1], out.shape[0])
    if rows.shape != (codes.shape[0],):
        raise ValueError(f"rows must be [{codes.shape[0]}], got {tuple(rows.shape)}")
    if out.dtype not in _DTYPE_CODE:  # e.g. fp8: fp32 product rounded once, as the reference does
        tmp = torch.empty(out.shape, dtype=torch.float32)
        dequantize_cpu(codes, rows, codebook, absmax, bits, group_size, tmp)
        index = rows.to(torch.int64)
        out[index] = tmp[index].to(out.dtype)
        return out
    codes, rows = codes.contiguous(), rows.to(torch.int64).contiguous()
    table, absmax = _table(codebook, bits), _scales(absmax)
    ext.dequant_group(*_group_args(codes, rows, table, absmax, bits, group_size, out.shape[1]),
                      out.data_ptr(), _DTYPE_CODE[out.dtype], out.stride(0), out.stride(1))
    return out


# ------------------------------------------------------------------------------ per-weight tables
@dataclass
class _Prepared:
    """The extension's arguments for one packed weight (raw pointers) and the tensors they point into.

    ``keep`` holds every pointed-to tensor except the weight's first codes tensor: that one is the cache
    entry's weakly held anchor (``WeightCache``), so a freed weight's entry and tables go with it; the
    entry is never used after the anchor dies, so its pointer never dangles.
    """

    keep: list[torch.Tensor]  # contiguous codes (but the anchor), int64 rows, fp32 tables, absmax
    args: list[tuple] = field(default_factory=list)  # each group's extension arguments (_group_args)
    layer: Any = None  # the extension's LayerPlan over every group (the fused forward GEMV's argument)


_prepared = WeightCache()


_static: dict[int, tuple[weakref.ref, list[tuple[torch.Tensor | None, torch.Tensor]], tuple[torch.Tensor, ...]]] = {}


def _parts_of(w: PackedWeight) -> tuple[torch.Tensor, ...]:
    """The tensors ``static_parts`` derives from, but the anchor (held strongly by its entry: ids of dead
    tensors are reused, so an entry keyed by identity must keep what it compares)."""
    return (*w.codes[1:], *w.rows)


def static_parts(w: PackedWeight) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each width's contiguous codes and int64 row indices, kept per weight while its first codes tensor
    lives (held weakly, as ``WeightCache`` does): they never change, while trainable codebooks change
    every step and ``_build`` runs again."""
    anchor = w.codes[0]
    slot = id(anchor)
    entry, held = _static.get(slot), _parts_of(w)
    if (entry is None or entry[0]() is not anchor or len(entry[2]) != len(held)
            or any(a is not b for a, b in zip(held, entry[2], strict=True))):
        parts = []
        for c, r in zip(w.codes, w.rows, strict=True):
            cc = c.contiguous()
            parts.append((None if cc is c else cc, r.to(torch.int64).contiguous()))  # None: the codes as given

        def forget(ref: weakref.ref, slot: int = slot) -> None:
            if slot in _static and _static[slot][0] is ref:
                del _static[slot]

        entry = (weakref.ref(anchor, forget), parts, held)
        _static[slot] = entry
    return [(w.codes[j] if c is None else c, r) for j, (c, r) in enumerate(entry[1])]


def _build(w: PackedWeight) -> _Prepared:
    check_packed(w)  # the extension reads raw pointers: shapes are checked once per weight
    absmax = _scales(w.absmax)
    prep = _Prepared([absmax])
    for (b, _, _, cb), (codes, rows) in zip(w.groups(), static_parts(w), strict=True):
        table = _table(cb, b)
        prep.keep += [t for t in (codes, rows, table) if t is not w.codes[0]]
        prep.args.append(_group_args(codes, rows, table, absmax, b, w.group_size, w.in_features))
    prep.layer = _require().make_layer(prep.args, w.out_features)
    return prep


def prepare(w: PackedWeight) -> _Prepared:
    """The extension's view of ``w`` (cached while its tensors are alive and unchanged in place)."""
    return _prepared.get(w, "cpu", lambda: _build(w))


def dequantize_weight_cpu(w: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``deq(W) [out, in]`` in ``dtype`` (bit-exact with the reference ``dequantize_weight``)."""
    ext = _require()
    prep = prepare(w)
    if dtype not in _DTYPE_CODE:
        return dequantize_weight_cpu(w, torch.float32).to(dtype)  # rounded once, as the reference
    out = torch.empty(w.shape, dtype=dtype)
    for args in prep.args:
        ext.dequant_group(*args, out.data_ptr(), _DTYPE_CODE[dtype], out.stride(0), out.stride(1))
    return out


def _check_activation(t: torch.Tensor, features: int, what: str) -> None:
    if t.shape[-1] != features:
        raise ValueError(f"{what} has {t.shape[-1]} features, the weight expects {features}")
    if not t.is_floating_point():
        raise ValueError(f"{what} must be a float tensor, got {t.dtype}")
    if t.is_cuda:
        raise ValueError(f"the CPU backend takes CPU tensors, {what} is on {t.device}")


def lut_matmul_cpu(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """``x [..., in] @ deq(W)ᵀ → [..., out]`` in ``x.dtype`` (fused GEMV for fp32 M ≤ 16)."""
    ext = _require()
    out_features, in_features = w.shape
    _check_activation(x, in_features, "x")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, out_features)
    if m <= GEMV_MAX_M and x.dtype == torch.float32:
        x2 = x2.contiguous()
        y = torch.empty(m, out_features, dtype=torch.float32)
        ext.layer_gemv(prepare(w).layer, x2.data_ptr(), m, y.data_ptr(), GEMV_GRAIN)
        return y.reshape(*lead, out_features)
    return x @ dequantize_weight_cpu(w, x.dtype).t()


def lut_lora_gemv_cpu(x: torch.Tensor, w: PackedWeight, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None,
                      scaling: float, bias: torch.Tensor | None = None, check: bool = True) -> torch.Tensor:
    """Decode step of a quantized LoRA linear in one extension pass: ``x deq(W)ᵀ + s (x Aᵀ) Bᵀ + bias``.

    ``x [..., in]`` fp32 with at most ``GEMV_MAX_M`` rows; ``lora_A [r, in]``, ``lora_B [out, r]``
    fp32 (or both None: no adapter); ``bias [out]`` fp32 or None, all contiguous. No autograd here:
    ``torch.ops.lowra.lut_linear`` runs it as its CPU forward (its backward is separate), with
    ``check=False`` as it has checked all of this already. Lean on purpose (one GEMV call per stored
    width + one ``lora_add``, cached per-weight arguments): this is the per-token host path.
    fp32-accurate against ``lut_lora_gemv_ref`` (summation order differs from BLAS), not bit-exact.
    """
    ext = _require()
    out_features, in_features = w.out_features, w.in_features
    lead = x.shape[:-1]
    if check:
        _check_activation(x, in_features, "x")
    m = x.numel() // in_features
    rank = 0 if lora_A is None else lora_A.shape[0]
    if check:
        if x.dtype != torch.float32 or not 0 < m <= GEMV_MAX_M:
            raise ValueError(f"lut_lora_gemv_cpu takes fp32 x with 1..{GEMV_MAX_M} rows, got {x.dtype} with {m}")
        _check_epilogue(lora_A, lora_B, bias, rank, in_features, out_features)
    xc = x.contiguous()  # (kept alive until the extension calls return)
    xp = xc.data_ptr()
    y = torch.empty((*lead, out_features), dtype=torch.float32)
    yp = y.data_ptr()
    ext.layer_gemv(prepare(w).layer, xp, m, yp, GEMV_GRAIN)
    if rank or bias is not None:
        ext.lora_add(xp, m, in_features, lora_A.data_ptr() if rank else 0, lora_B.data_ptr() if rank else 0, rank,
                     float(scaling), bias.data_ptr() if bias is not None else 0, yp, out_features)
    return y


def _check_epilogue(lora_A, lora_B, bias, rank: int, in_features: int, out_features: int) -> None:
    for name, t, shape in (("lora_A", lora_A, (rank, in_features)), ("lora_B", lora_B, (out_features, rank)),
                           ("bias", bias, (out_features,))):
        if t is not None and (t.dtype != torch.float32 or t.shape != shape or not t.is_contiguous()):
            raise ValueError(f"{name} must be contiguous fp32 {shape}, got {t.dtype} {tuple(t.shape)}")


class _NoLaunch:
    """The extension's entry points as no-ops (``stubbed_launches``)."""

    def dequant_group(self, *args: Any) -> None:
        return None

    gemv_group = gemv_t_group = lora_add = layer_gemv = make_layer = dequant_group
    set_no_launch = set_claim_pool = register_lut_linear_cpu = dequant_group


@contextlib.contextmanager
def stubbed_launches() -> Iterator[None]:
    """Within the block the extension's kernels do nothing (outputs stay unwritten): the host-time
    benchmark (``experiments.bench.host``) measures the Python path of a call without its work."""
    global _ext, _state
    saved = _ext, _state
    real = _ext if _state == "ready" and not isinstance(_ext, _NoLaunch) else None
    _ext, _state = _NoLaunch(), "ready"
    if real is not None:
        real.set_no_launch(True)  # lowra::lut_linear's C++ CPU kernel (compiled graphs) as well
    try:
        yield
    finally:
        _ext, _state = saved
        if real is not None:
            real.set_no_launch(False)


def lut_lora_gemv_ref(x: torch.Tensor, w: PackedWeight, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None,
                      scaling: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of ``lut_lora_gemv_cpu``: the same sum by the PyTorch reference matmul and ``F.linear``."""
    from lowra_kernels.lut_matmul import lut_matmul_ref

    y = lut_matmul_ref(x, w)
    if lora_A is not None:
        y = y + torch.nn.functional.linear(torch.nn.functional.linear(x, lora_A), lora_B) * scaling
    return y if bias is None else y + bias


def lut_matmul_backward_cpu(grad_y: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """``grad_y [..., out] @ deq(W) → [..., in]`` in ``grad_y.dtype`` (fused for fp32 M ≤ 16)."""
    ext = _require()
    out_features, in_features = w.shape
    _check_activation(grad_y, out_features, "grad_y")
    lead = grad_y.shape[:-1]
    gy = grad_y.reshape(-1, out_features)
    m = gy.shape[0]
    if m == 0:
        return grad_y.new_zeros(*lead, in_features)
    if m <= GEMV_MAX_M and grad_y.dtype == torch.float32:
        prep = prepare(w)
        gy = gy.contiguous()
        gx = torch.zeros(m, in_features, dtype=torch.float32)
        for args in prep.args:
            ext.gemv_t_group(*args, gy.data_ptr(), m, out_features, gx.data_ptr())
        return gx.reshape(*lead, in_features)
    return grad_y @ dequantize_weight_cpu(w, grad_y.dtype)
