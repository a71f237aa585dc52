"""Environment variables: values, defaults, and one clear warning for a bad value."""

import os
import warnings

import pytest

from metal_flash_sdpa import config


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(config, "_warned", set())
    for name in (config.ENABLE_VAR, config.MIN_SEQ_LEN_VAR, config.LOG_VAR, config.SELFCHECK_VAR, config.CACHE_DIR_VAR):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    "value, mode",
    [(None, "auto"), ("", "auto"), ("auto", "auto"), ("1", "on"), ("true", "on"), (" ON ", "on"), ("0", "off"), ("false", "off"), ("Off", "off")],
)
def test_enable_modes(fresh, value, mode):
    if value is not None:
        fresh.setenv(config.ENABLE_VAR, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert config.enable_mode() == mode


@pytest.mark.parametrize("value, expected", [(None, 256), ("0", 0), ("1024", 1024), (" 64 ", 64)])
def test_min_seq_len(fresh, value, expected):
    if value is not None:
        fresh.setenv(config.MIN_SEQ_LEN_VAR, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert config.min_seq_len() == expected


@pytest.mark.parametrize(
    "variable, value, call, fallback",
    [
        (config.ENABLE_VAR, "maybe", config.enable_mode, "auto"),
        (config.MIN_SEQ_LEN_VAR, "-3", config.min_seq_len, 256),
        (config.MIN_SEQ_LEN_VAR, "lots", config.min_seq_len, 256),
        (config.LOG_VAR, "loud", config.log_fallbacks, False),
        (config.SELFCHECK_VAR, "sometimes", config.selfcheck_mode, "on"),
    ],
)
def test_invalid_value_warns_once_and_uses_default(fresh, variable, value, call, fallback):
    fresh.setenv(variable, value)
    with pytest.warns(RuntimeWarning) as caught:
        assert call() == fallback
        assert call() == fallback
    assert len(caught) == 1
    message = str(caught[0].message)
    assert variable in message and repr(value) in message and "using" in message


def test_settings_lists_every_variable(fresh):
    fresh.setenv(config.MIN_SEQ_LEN_VAR, "512")
    assert config.settings() == {
        "MFA_ENABLE": (None, "auto"),
        "MFA_MIN_SEQ_LEN": ("512", 512),
        "MFA_LOG": (None, False),
        "MFA_SELFCHECK": (None, "on"),
        "MFA_CALIBRATE": (None, "on"),
        "MFA_CACHE_DIR": (None, os.path.join(os.path.expanduser("~"), ".cache", "metal-flash-sdpa")),
    }


@pytest.mark.parametrize("value, mode", [(None, "on"), ("1", "on"), ("0", "off"), ("off", "off"), (" Always ", "always")])
def test_selfcheck_modes(fresh, value, mode):
    if value is not None:
        fresh.setenv(config.SELFCHECK_VAR, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert config.selfcheck_mode() == mode


def test_cache_dir(fresh, tmp_path):
    fresh.setenv(config.CACHE_DIR_VAR, str(tmp_path))
    assert config.cache_dir() == str(tmp_path)
    fresh.setenv(config.CACHE_DIR_VAR, "~/verdicts")
    assert config.cache_dir() == os.path.join(os.path.expanduser("~"), "verdicts")
