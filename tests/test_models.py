"""The embedded default model (docs/training.md, issue 5 item 6): built offline from a seed, cached
under a
recipe hash, reused, loadable by the Auto classes; the character tokenizer round-trips."""

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from appo import models  # noqa: E402


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("APPO_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # building must not need the network
    return tmp_path


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_builds_offline_and_loads_with_auto_classes(cache):
    path = models.default_model_dir()
    assert path.parent == cache and path.name.startswith("default-")
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.head_dim == 64
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    assert q_proj.shape == (cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size)
    assert cfg.vocab_size == len(tok) == (len(models.SPECIAL_TOKENS) + len(models.CHARS)
                                          + len(models.TAG_TOKENS))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (
        cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id)
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temporary directory left behind


def test_second_use_reuses_the_cached_directory(cache, monkeypatch):
    first, _ = models.load_default()
    path = models.default_model_dir()
    stamp = (path / "model.safetensors").stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached model was rebuilt")

    monkeypatch.setattr(models, "build_model_dir", no_rebuild)
    second, _ = models.load_default()
    assert models.default_model_dir() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name


def test_changed_recipe_gets_a_new_directory(cache):
    base = models.default_model_dir()
    smaller = dict(models.DEFAULT_CONFIG, num_hidden_layers=1)
    assert models.default_model_dir(config=smaller) != base
    assert models.default_model_dir(seed=models.DEFAULT_SEED + 1) != base
    assert len(list(cache.iterdir())) == 3


def test_weights_are_a_function_of_the_seed(tmp_path, monkeypatch):
    built = []
    for root, seed in (("a", 0), ("b", 0), ("c", 1)):
        monkeypatch.setenv("APPO_CACHE", str(tmp_path / root))
        built.append(state(models.load_default(seed=seed)[0]))
    assert all(torch.equal(built[0][k], built[1][k]) for k in built[0])
    assert not torch.equal(built[0]["lm_head.weight"], built[2]["lm_head.weight"])


def test_a_failed_build_leaves_nothing(cache, monkeypatch):
    def broken(path, config=None, seed=0):
        os.makedirs(path)
        (path / "config.json").write_text("{")  # half-written
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "build_model_dir", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        models.default_model_dir()
    assert list(cache.iterdir()) == []


def test_tokenizer_round_trips_printable_ascii(cache):
    tok = transformers.AutoTokenizer.from_pretrained(models.default_model_dir())
    text = "".join(chr(c) for c in range(0x20, 0x7F)) + "\n  two  spaces\n\n<answer 4 /answer>"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1  # one token per character
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.encode(text, add_special_tokens=False) == ids[1:]
    # characters outside the alphabet become <unk>; special-token text can be kept as plain text
    assert tok.encode("é\t", add_special_tokens=False) == [tok.unk_token_id] * 2
    assert tok.encode("<eos>", add_special_tokens=False, split_special_tokens=True) == \
        tok.encode("<", add_special_tokens=False) + tok.encode("eos>", add_special_tokens=False)


def test_protocol_tags_are_one_token_each_and_round_trip(cache):
    tok = transformers.AutoTokenizer.from_pretrained(models.default_model_dir())
    text = "x<calculator>3+4</calculator><result>7</result>\n<answer>7</answer></python><"
    tokens = tok.convert_ids_to_tokens(tok.encode(text, add_special_tokens=False))
    assert tokens == (["x", "<calculator>", "3", "+", "4", "</calculator>", "<result>", "7",
                       "</result>", "\n", "<answer>", "7", "</answer>", "</python>", "<"])
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    # a tag spelled with other characters in it stays characters
    assert len(tok.encode("<answer >", add_special_tokens=False)) == len("<answer >")
    plain = models.char_tokenizer(tags=False)
    assert len(plain) == len(models.SPECIAL_TOKENS) + len(models.CHARS)
    assert plain.encode(text, add_special_tokens=False) == [
        models.vocabulary()[c] for c in text]


def test_load_default_device_and_dtype(cache):
    model, tok = models.load_default(dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and not model.training
    ids = torch.tensor([tok.encode("1+1=")])
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))
