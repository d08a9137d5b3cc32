"""lorainit.cache.store and lorainit.cache.key in isolation: the streaming safetensors writer against the
safetensors library's reader, the model and data fingerprints, the mismatch wording."""
import json

import pytest
import torch
from helpers import tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorainit import LoRAInitError
from lorainit.cache import key as cache_key_module
from lorainit.cache import store


def _awkward_tensors():
    g = torch.Generator().manual_seed(7)
    return [
        ("layers.0.q/Z", torch.randn(37, 37, generator=g, dtype=torch.float64)),
        ("layers.0.q/G", torch.randn(29, 37, generator=g).t()),  # non-contiguous: written as its values
        ("layers.0.q/s", torch.rand(29, generator=g).to(torch.bfloat16)),
        ("emb/Z", torch.randn(13, generator=g).to(torch.float16)),
        ("empty", torch.empty(0, 5)),
        ("counts", torch.randint(-5, 9, (3, 4), generator=g, dtype=torch.int64)),
        ("ids", torch.randint(-5, 9, (7,), generator=g, dtype=torch.int32)),
        ("scalar", torch.tensor(2.5)),
    ]


def test_streaming_writer_is_read_back_exactly_by_safetensors(tmp_path):
    tensors = _awkward_tensors()
    meta = {store.META_KEY: json.dumps({"format": store.FORMAT, "x": [1, 2]}), "other": "é"}
    path = tmp_path / "mine.safetensors"
    store._write_safetensors(path, tensors, meta)
    back = load_file(str(path))
    assert sorted(back) == sorted(k for k, _ in tensors)
    for name, t in tensors:
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert torch.equal(back[name], t), name
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == meta
    # the same tensors through the library's writer read back the same
    ref = tmp_path / "ref.safetensors"
    save_file({k: t.contiguous() for k, t in tensors}, str(ref), metadata=meta)
    lib = load_file(str(ref))
    assert all(torch.equal(lib[k], back[k]) for k in lib)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_writer_refuses_an_unsupported_dtype_and_a_failing_copy_leaves_no_file(tmp_path):
    path = tmp_path / "c.safetensors"
    with pytest.raises(LoRAInitError, match=r"cannot store 'flags' of dtype torch.bool"):
        store._write_safetensors(path, [("ok", torch.ones(2)), ("flags", torch.ones(2, dtype=torch.bool))], {})
    with pytest.raises(Exception):  # a meta tensor has no data to copy: fails mid-write
        store._write_safetensors(path, [("ok", torch.ones(2)), ("meta", torch.empty(3, device="meta"))], {})
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary name


def test_check_path_and_part_names(tmp_path):
    p = tmp_path / "stats.safetensors"
    assert store.check_path(str(p)) == p and store.check_path(p) == p
    for bad, match in ((tmp_path, "is a directory"), (tmp_path / "no" / "x.st", "does not exist"),
                       (3, "must be a file path"), ("  ", "must be a file path"), (True, "must be a file path")):
        with pytest.raises(LoRAInitError, match=match):
            store.check_path(bad)
    assert store.part_name(p, 2, 5) == "stats.pass-2-of-5.safetensors"
    assert store.part_name(tmp_path / "stats", 1, 3) == "stats.pass-1-of-3.safetensors"


def test_cache_files_of_a_foreign_or_missing_file_is_the_path_alone(tmp_path):
    p = tmp_path / "x.safetensors"
    assert store.cache_files(p) == [p]
    save_file({"x": torch.arange(3.0)}, str(p))
    assert store.cache_files(p) == [p]


def test_model_fingerprint_ignores_lora_and_base_layer_names_and_sees_a_changed_weight():
    a, b = tiny_llama(seed=3), tiny_llama(seed=3, layers_to_transform=[0])  # other layers wrapped by PEFT
    fa, pa = cache_key_module.model_fingerprint(a)
    fb, pb = cache_key_module.model_fingerprint(b)
    assert fa == fb and pa == pb
    assert not any("lora_" in n or "base_layer" in n for n in pa)
    w = next(p for n, p in a.named_parameters() if n.endswith("layers.1.self_attn.q_proj.base_layer.weight"))
    with torch.no_grad():
        w.view(-1)[0] += 1.0  # the first element is always among the sampled ones
    fc, pc = cache_key_module.model_fingerprint(a)
    assert fc != fa and [n for n in pc if pc[n] != pa[n]] == ["base_model.model.model.layers.1.self_attn.q_proj.weight"]


def test_data_fingerprint_tells_contents_apart_and_says_when_it_could_not_hash():
    g = torch.Generator().manual_seed(0)
    b1 = [{"input_ids": torch.randint(0, 50, (2, 7), generator=g), "n": 3}]
    b2 = [{"input_ids": b1[0]["input_ids"].clone(), "n": 3}]
    h1, ok1 = cache_key_module.data_fingerprint(b1)
    assert ok1 and cache_key_module.data_fingerprint(b2) == (h1, True)
    b2[0]["input_ids"][1, 3] += 1
    assert cache_key_module.data_fingerprint(b2)[0] != h1
    assert cache_key_module.data_fingerprint([{"input_ids": b1[0]["input_ids"].float(), "n": 3}])[0] != h1  # dtype
    h, ok = cache_key_module.data_fingerprint([{"x": object()}])
    assert not ok and isinstance(h, str)


def test_name_examples_shows_three_and_counts_the_rest():
    assert cache_key_module.name_examples(["a", "b"]) == "'a', 'b'"
    assert cache_key_module.name_examples(list("abcde")) == "'a', 'b', 'c', ... (5 in all)"
