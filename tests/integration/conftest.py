"""A tiny causal LM saved to disk with its own tokenizer (built locally: nothing is downloaded)."""
import json
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*bos_token_id.*|.*eos_token_id.*")

WORDS = ("the a cat dog sat ran on under mat rug big small red blue quickly slowly and then it was "
         "low rank adapters learn fast data aware init").split()


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def sentences(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 12, (1,), generator=g))
        out.append(" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (length,), generator=g)))
    return out


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


class Recorder:
    """Records the LoRA weights the first optimizer step starts from (``Trainer(callbacks=[rec.callback()])``)."""

    def __init__(self):
        self.weights = None

    def callback(self):
        from transformers import TrainerCallback

        rec = self

        class _Cb(TrainerCallback):
            def on_step_begin(self, args, state, control, model=None, **kw):
                if rec.weights is None:
                    rec.weights = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}

        return _Cb()
