"""experiments.runner.hub and the runner's Hub loads: no network means a fast, actionable failure."""

from __future__ import annotations

import socket

import pytest
from hydra import compose, initialize_config_dir

from experiments.runner import hub
from experiments.runner.config_check import CONF_DIR
from experiments.runner.data import DataUnavailableError, load_data
from experiments.runner.setup import ModelUnavailableError, load_model, load_tokenizer


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="run", overrides=overrides)


def test_hub_reachable_against_a_listening_and_a_closed_port():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        assert hub.hub_reachable(f"http://127.0.0.1:{port}", timeout=2.0)
    finally:
        server.close()
    hub.hub_reachable.cache_clear()  # checked once per process and endpoint
    assert not hub.hub_reachable(f"http://127.0.0.1:{port}", timeout=2.0)  # nothing listens any more
    assert not hub.hub_reachable("http://name.invalid", timeout=2.0)


@pytest.fixture
def no_network(monkeypatch):
    """HF_HUB_OFFLINE unset, and the Hub endpoint does not answer."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "offline_mode", lambda: False)
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: False)


def test_hub_model_without_network_fails_at_once_with_the_local_path_hint(no_network, monkeypatch):
    import huggingface_hub.constants as hf_constants
    import transformers

    offline_during_load = []
    original = transformers.AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        offline_during_load.append(hf_constants.HF_HUB_OFFLINE)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    cfg = _compose(["+model=mistral7b", "model.pretrained=lowra-test/not-a-cached-model"])
    with pytest.raises(ModelUnavailableError, match=r"no network connection to .*not in the local Hugging Face "
                                                    r"cache.*model\.pretrained=/path/to/mistral7b model\.source=local"):
        load_tokenizer(cfg.model)
    assert offline_during_load == [True]  # the cache only: no download attempts, no retries
    assert hf_constants.HF_HUB_OFFLINE is False  # restored afterwards
    with pytest.raises(ModelUnavailableError, match="no network connection"):
        load_model(cfg.model, __import__("torch").device("cpu"))


def test_local_models_ignore_the_network_check(no_network):
    cfg = _compose([])
    assert load_tokenizer(cfg.model) is not None  # stories260K from the assets directory


def test_hub_dataset_without_network_fails_at_once(no_network, monkeypatch):
    import datasets

    def no_call(*args, **kwargs):
        raise AssertionError("load_dataset must not be attempted without a network")

    monkeypatch.setattr(datasets, "load_dataset", no_call)
    cfg = _compose(["data=wikitext2"])
    tok = load_tokenizer(cfg.model)
    with pytest.raises(DataUnavailableError,
                       match=r"no network connection.*HF_DATASETS_OFFLINE=1.*data\.local\.train="):
        load_data(cfg.data, tok, need_train=True)
