"""Hugging Face Hub access that fails fast without a network.

Without ``HF_HUB_OFFLINE``, ``from_pretrained("org/model")`` on a machine with no network retries
for over a minute before it gives up. Before any Hub load the runner asks :func:`hub_reachable`
(a TCP connection to the Hub endpoint, name lookup included, within ``timeout`` seconds, checked
once per process and endpoint). When the Hub cannot be reached, models are loaded with
``local_files_only=True`` (the local cache still works) and a miss fails at once with a message
that says how to point the config at a local copy; datasets fail at once with the same kind of
message (``HF_DATASETS_OFFLINE=1`` uses a cached copy).
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import socket
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger("experiments.hub")

CONNECT_TIMEOUT_S = 3.0
_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_endpoint() -> str:
    """The Hub URL (``HF_ENDPOINT`` or https://huggingface.co)."""
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT)
    except ImportError:  # pragma: no cover - installed with transformers
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def offline_mode() -> bool:
    """``HF_HUB_OFFLINE`` is set (the environment now, or huggingface_hub's value at import)."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return False


@functools.lru_cache(maxsize=8)
def hub_reachable(endpoint: str | None = None, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the Hub endpoint opens within ``timeout`` seconds (DNS included)."""
    url = urlparse(endpoint or hub_endpoint())
    host = url.hostname
    if not host:
        return False
    port = url.port or (443 if url.scheme == "https" else 80)

    def connect() -> bool:
        with socket.create_connection((host, port), timeout=timeout):
            return True

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:  # getaddrinfo has no timeout of its own: bound the whole attempt
        return pool.submit(connect).result(timeout=timeout)
    except (OSError, concurrent.futures.TimeoutError):
        return False
    finally:
        pool.shutdown(wait=False)


def no_network_reason() -> str | None:
    """Why Hub downloads cannot happen (offline mode or no connection), or None when they can."""
    if offline_mode():
        return "HF_HUB_OFFLINE is set"
    if not hub_reachable():
        return f"no network connection to {hub_endpoint()} (checked within {CONNECT_TIMEOUT_S:g} s)"
    return None


def model_load_kwargs(source: str) -> tuple[dict[str, Any], str | None]:
    """Extra ``from_pretrained`` kwargs for a model ``source`` (``hub``/``local``) and the offline reason.

    A Hub model with no network is read from the local cache only (``local_files_only=True``).
    """
    if source != "hub":
        return {}, None
    reason = no_network_reason()
    if reason is not None and not offline_mode():
        log.warning("%s: loading Hub models from the local cache only", reason)
        return {"local_files_only": True}, reason
    return {}, reason
