"""Hugging Face Hub access that fails fast without a network.

Without ``HF_HUB_OFFLINE``, ``from_pretrained("org/model")`` on a machine with no network retries
for over a minute before it gives up. Before any Hub load the runner asks :func:`hub_reachable`
(a TCP connection to the Hub endpoint, name lookup included, within ``timeout`` seconds, checked
once per process and endpoint). When the Hub cannot be reached, models are loaded in
huggingface_hub's offline mode (the local cache still works) and a miss fails at once with a message
that says how to point the config at a local copy; datasets fail at once with the same kind of
message (``HF_DATASETS_OFFLINE=1`` uses a cached copy).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import os
import socket
from collections.abc import Iterator
from urllib.parse import urlparse

log = logging.getLogger("experiments.runner.hub")

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


@contextlib.contextmanager
def hub_access(source: str) -> Iterator[str | None]:
    """Context for loading a model from ``source`` (``hub``/``local``); yields why the Hub is offline (or None).

    A Hub model with no network is read from the local cache only: huggingface_hub's offline mode
    is switched on for the duration of the block (``local_files_only=True`` alone is not enough:
    transformers still looks up an adapter config online, with a minute of retries).
    """
    if source != "hub":
        yield None
        return
    reason = no_network_reason()
    if reason is None or offline_mode():
        yield reason
        return
    log.warning("%s: loading Hub models from the local cache only", reason)
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield reason
    finally:
        constants.HF_HUB_OFFLINE = saved
