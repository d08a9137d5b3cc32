"""What the integration tests share: a word-level tokenizer, random sentences, a Trainer callback recorder."""
import torch

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
