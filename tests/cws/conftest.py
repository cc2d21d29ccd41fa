"""The tiny BERT fixture with a small WordPiece vocabulary, shared by the CWS tests that read text."""

import os
import shutil

import pytest

from tests.conftest import TINY_BERT

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog", "cf", "the", "sat", "on"]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny BERT fixture plus a small WordPiece vocabulary, so that it can read text."""
    root = tmp_path_factory.mktemp("tiny-bert-text")
    shutil.copy(os.path.join(str(TINY_BERT), "config.json"), root / "config.json")
    shutil.copy(os.path.join(str(TINY_BERT), "model.safetensors"), root / "model.safetensors")
    vocab = WORDS + [f"tok{i}" for i in range(1000 - len(WORDS))]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return str(root)


@pytest.fixture(scope="session")
def encoder(tiny_dir):
    from diverify.models import load_text_encoder

    return load_text_encoder(tiny_dir)
