"""Shared fixtures."""

import pytest


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """The 'tiny' corpus with a 1,024-token BPE, tokenised once per test session (a few seconds)."""
    from openk2.data.dataset import build_dataset
    from openk2.data.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("tiny-data")
    tok, _ = train_tokenizer("tiny", 1024)
    tok.save(d / "tokenizer")
    build_dataset(d, tok, "tiny", progress=False)
    return d
