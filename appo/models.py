"""The embedded default model (docs/training.md): a tiny Llama and a character tokenizer, built
locally.

`appo train` with no arguments needs a model without a download. This module generates one from a
seed on first use and caches it as an ordinary Hugging Face directory (`config.json`,
`model.safetensors`, `tokenizer.json`), so `AutoModelForCausalLM.from_pretrained(dir)`,
`AutoTokenizer.from_pretrained(dir)` and vLLM load it like any other checkpoint.

- Tokenizer: one token per character of printable ASCII (0x20-0x7E) and newline, plus the special
  tokens `<pad>` (0), `<bos>` (1), `<eos>` (2), `<unk>` (3, for any other character), plus one
  token for each tag of the tool protocol (`TAG_TOKENS`: `<calculator>`, `</calculator>`,
  `<python>`, ..., `</answer>`), matched wherever the exact tag appears. Encoding a text prepends
  `<bos>` (as Llama tokenizers do); `add_special_tokens=False` leaves it out. Decoding gives the
  text back exactly.
- Model: Llama architecture with head_dim 64 (vLLM's CPU attention rejects smaller head sizes),
  4 heads x 64 over hidden 128, 2 layers, MLP 384, about 0.59M parameters. The embeddings are
  untied: with a 108-token vocabulary tying saves nothing worth having, and untied weights keep
  the RL update of the output layer from moving the input embeddings.
- Cache: `$APPO_CACHE` (default `~/.cache/appo`) / `default-<hash>`, the hash covering the model
  config, the vocabulary, the seed and `FORMAT_VERSION`, so a changed recipe never reuses stale
  files. A directory is built in a temporary sibling and renamed into place, so a crash or a
  concurrent build never leaves a half-written model behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from appo.rollout.format import ANSWER_CLOSE, ANSWER_OPEN, RESULT_CLOSE, RESULT_OPEN

FORMAT_VERSION = 2  # bump when the build recipe changes in a way the config does not show
DEFAULT_SEED = 0

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = SPECIAL_TOKENS
CHARS = "\n" + "".join(chr(c) for c in range(0x20, 0x7F))  # newline + printable ASCII
# the tool protocol's tags, one token each (as chat models give their tool-call markers their own
# tokens): they are 70% of the characters of a calc demonstration, so spelling them out character
# by character made sequences 2.4x longer and left the model room to misspell the format
TAG_TOKENS = (*(f"<{slash}{tool}>" for tool in ("calculator", "python") for slash in ("", "/")),
              RESULT_OPEN, RESULT_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

DEFAULT_CONFIG = dict(
    hidden_size=128,
    # four heads of 64 (q/o projections 128 <-> 256): with two, the warm start's copying formed
    # for some seeds only (measured with the default warm start: held-out accuracy after RL
    # 10% for seed 0 with two heads, 56% with four; docs/training.md)
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=64,  # vLLM's CPU attention needs >= 64 (issue 5)
    # two layers learn the calc scratchpad (copy with one substitution) in fewer steps than four,
    # at half the cost per step (measured: 12% vs 2% greedy accuracy after 400 warm-start steps)
    num_hidden_layers=2,
    intermediate_size=384,
    max_position_embeddings=2048,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    initializer_range=0.02,
    tie_word_embeddings=False,
)


def vocabulary(tags: bool = True) -> dict[str, int]:
    """Token -> id: the special tokens, the characters, then (with `tags`) the protocol tags."""
    tokens = list(SPECIAL_TOKENS) + list(CHARS) + (list(TAG_TOKENS) if tags else [])
    return {token: i for i, token in enumerate(tokens)}


def char_tokenizer(tags: bool = True):
    """The character-level tokenizer as a `transformers` fast tokenizer (not saved anywhere);
    `tags=False` leaves out the tag tokens, so every character of every text is one token."""
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers,
                            processors)
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary(tags)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    if tags:  # added tokens are matched in the raw text before the split into characters
        tok.add_tokens([AddedToken(tag, normalized=False) for tag in TAG_TOKENS])
    # every character is its own pre-token ([\s\S] also matches newline, which "." would not)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # concatenate the characters back, no separators
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])])
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=DEFAULT_CONFIG["max_position_embeddings"])


def llama_config(config: Optional[dict] = None):
    from transformers import LlamaConfig

    vocab = vocabulary()
    return LlamaConfig(
        vocab_size=len(vocab), pad_token_id=vocab[PAD], bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS], **(DEFAULT_CONFIG if config is None else config))


def cache_root() -> Path:
    return Path(os.environ.get("APPO_CACHE") or Path.home() / ".cache" / "appo")


def recipe_hash(config: Optional[dict] = None, seed: int = DEFAULT_SEED) -> str:
    recipe = {"config": DEFAULT_CONFIG if config is None else config, "vocab": list(vocabulary()),
              "seed": seed, "format": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


@contextlib.contextmanager
def _no_progress_bars():
    """transformers draws a progress bar per save/load; for a 1M-parameter model that is noise."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def build_model_dir(path: Path, config: Optional[dict] = None, seed: int = DEFAULT_SEED) -> None:
    """Write a freshly initialised model and the tokenizer to `path` (which must not exist)."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama_config(config))
    with _no_progress_bars():
        model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)


def default_model_dir(config: Optional[dict] = None, seed: int = DEFAULT_SEED) -> Path:
    """The cached model directory for this recipe, built on first use."""
    root = cache_root()
    final = root / f"default-{recipe_hash(config, seed)}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        build_model_dir(tmp / "model", config, seed)
        try:
            os.rename(tmp / "model", final)  # atomic: the directory appears complete or not at all
        except OSError:
            if not final.is_dir():  # not a lost race with a concurrent build
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_default(device="cpu", dtype=torch.float32, config: Optional[dict] = None,
                 seed: int = DEFAULT_SEED):
    """(model, tokenizer) of the embedded default model, in eval mode on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_dir(config, seed)
    with _no_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


# ----------------------------------------------------------------------------------------------
# any model: a local transformers directory or a GGUF file

def is_gguf(path) -> bool:
    return Path(path).suffix.lower() == ".gguf"


def load_model(path, dtype=torch.float32, device="cpu"):
    """(model, tokenizer) from a local transformers model directory or a `.gguf` file, in eval
    mode on `device`. Nothing is downloaded. A GGUF file is dequantised to `dtype` into an
    ordinary model (transformers' GGUF loader; needs `gguf`, the `gguf` extra), which saves and
    loads like any other checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise ValueError(f"actor_rollout_ref.model.path: {str(path)!r} does not exist (a local "
                         f"transformers model directory or a .gguf file; nothing is downloaded)")
    if is_gguf(path):
        import importlib.util

        if importlib.util.find_spec("gguf") is None:
            raise ValueError(f"actor_rollout_ref.model.path: loading {path.name} needs the gguf "
                             f"package (pip install gguf accelerate: appo's gguf extra)")
        where = dict(pretrained_model_name_or_path=path.parent, gguf_file=path.name)
        with _no_progress_bars():
            quantized = AutoModelForCausalLM.from_pretrained(**where, dtype=dtype)
        model = _without_quantizer(quantized, dtype)
        tokenizer = AutoTokenizer.from_pretrained(**where)
    elif (path / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        raise ValueError(f"actor_rollout_ref.model.path: {str(path)!r} is neither a model "
                         f"directory (with a config.json) nor a .gguf file")
    return model.to(device).eval(), tokenizer


def _without_quantizer(quantized, dtype):
    """The same weights in a plain model: a GGUF-loaded model keeps transformers' GGUF quantizer,
    which refuses `save_pretrained`, though its weights are already dequantised floats."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    return model


def save_model(model, tokenizer, path) -> None:
    """`save_pretrained` of the model and its tokenizer into `path` (created)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with _no_progress_bars():
        model.save_pretrained(path)
    tokenizer.save_pretrained(path)
