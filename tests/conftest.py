"""Shared test setup: quiet progress bars, deterministic torch, and the digits reference model."""

from __future__ import annotations

import os

import pytest
import torch
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def digits():
    """scikit-learn digits as a DatasetDict(train=1438, test=359) with Image/ClassLabel features."""
    from hf_ptq.builtin_data import load_digits_dataset

    return load_digits_dataset()


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory):
    """A small transformers ResNet trained on digits (≈99 % top-1), saved with its image processor.

    Trained once per machine and cached under ~/.cache/hf_ptq (HF_PTQ_CACHE), like the quickstart.
    """
    from hf_ptq.quickstart import train_digits_checkpoint

    return train_digits_checkpoint()
