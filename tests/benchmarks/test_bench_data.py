"""The setup step's install check: clear messages when the dataset is missing and cannot be installed."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import data


def test_present_files_need_no_install(tmp_path, monkeypatch):
    for f in data._FILES:
        (tmp_path / f).write_bytes(b"")
    monkeypatch.setattr(data.subprocess, "run", lambda *a, **k: pytest.fail("must not call apt-get"))
    assert data.ensure_fashion_mnist(tmp_path) == tmp_path


def test_custom_dir_missing_names_the_files(tmp_path):
    with pytest.raises(RuntimeError, match="HF_PTQ_FASHION_MNIST_DIR"):
        data.ensure_fashion_mnist(tmp_path)


@pytest.fixture
def missing_default(monkeypatch):
    monkeypatch.setattr(data, "_present", lambda root: False)
    monkeypatch.setattr(data.subprocess, "run", lambda *a, **k: pytest.fail("must not call apt-get"))
    return Path("/usr/share/datasets/fashion-mnist")


def test_not_root_prints_the_command(missing_default, monkeypatch):
    monkeypatch.setattr(data.shutil, "which", lambda name: "/usr/bin/apt-get")
    monkeypatch.setattr(data.os, "geteuid", lambda: 1000)
    with pytest.raises(RuntimeError, match=r"needs root.*apt-get install -y dataset-fashion-mnist"):
        data.ensure_fashion_mnist(missing_default)


def test_install_disabled_or_no_apt(missing_default, monkeypatch):
    with pytest.raises(RuntimeError, match="not installed; run"):
        data.ensure_fashion_mnist(missing_default, install=False)
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get is not available"):
        data.ensure_fashion_mnist(missing_default)


def test_root_installs_then_updates_on_failure(monkeypatch):
    calls, state = [], {"installed": False}

    def fake_run(cmd, **kwargs):
        calls.append(cmd[:2])
        ok = cmd[1] == "update" or len(calls) > 1  # first install fails (stale lists), retry succeeds
        if cmd[1] == "install" and ok:
            state["installed"] = True
        return type("P", (), {"returncode": 0 if ok else 100})()

    monkeypatch.setattr(data, "_present", lambda root: state["installed"])
    monkeypatch.setattr(data.shutil, "which", lambda name: "/usr/bin/apt-get")
    monkeypatch.setattr(data.os, "geteuid", lambda: 0)
    monkeypatch.setattr(data.subprocess, "run", fake_run)
    data.ensure_fashion_mnist(Path("/usr/share/datasets/fashion-mnist"))
    assert calls == [["apt-get", "install"], ["apt-get", "update"], ["apt-get", "install"]]
