"""A hub id that cannot be downloaded fails at once with a message about the network or offline mode (not after
30 s of retries with one that blames the folder)."""

import socket

import pytest
import torch
from huggingface_hub import constants

from ldm_app import loading
from ldm_app.loading import load_pipeline


def load(model, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the download was tried (and retried) before the error")

    monkeypatch.setattr(loading, "load_model", never)
    with pytest.raises(ValueError) as err:
        load_pipeline(model, torch.device("cpu"), torch.float32)
    return str(err.value)


def test_offline_mode_is_named(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    message = load("someone/not-cached-model", monkeypatch)
    assert "offline mode (HF_HUB_OFFLINE=1)" in message and "model_index.json" not in message


def test_no_network_is_named(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)

    def unreachable(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    message = load("someone/not-cached-model", monkeypatch)
    assert "cannot be reached (no network?)" in message and "model_index.json" not in message
