"""A tiny causal LM saved to disk with its own tokenizer (built locally: nothing is downloaded).

The helpers the tests import live in ``integration_helpers`` (several folders have a conftest.py, so
``from conftest import ...`` would reach whichever was imported first).
"""
import json
import warnings

import pytest
import torch

from integration_helpers import build_tokenizer, sentences

warnings.filterwarnings("ignore", message=".*bos_token_id.*|.*eos_token_id.*")


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def jsonl_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps({"text": s}) for s in sentences(24)) + "\n")
    return path
