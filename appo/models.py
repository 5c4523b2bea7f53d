"""The embedded default model (SPEC §4): a tiny Llama and a character tokenizer, built locally.

`appo train` with no arguments needs a model without a download. This module generates one from a
seed on first use and caches it as an ordinary Hugging Face directory (`config.json`,
`model.safetensors`, `tokenizer.json`), so `AutoModelForCausalLM.from_pretrained(dir)`,
`AutoTokenizer.from_pretrained(dir)` and vLLM load it like any other checkpoint.

- Tokenizer: one token per character of printable ASCII (0x20-0x7E) and newline, plus the special
  tokens `<pad>` (0), `<bos>` (1), `<eos>` (2), `<unk>` (3, for any other character). Encoding a
  text prepends `<bos>` (as Llama tokenizers do); `add_special_tokens=False` leaves it out.
- Model: Llama architecture with head_dim 64 (vLLM's CPU attention rejects smaller head sizes),
  2 heads x 64 = hidden 128, 4 layers, MLP 384, about 0.9M parameters. The embeddings are untied:
  with a 100-token vocabulary tying saves nothing worth having, and untied weights keep the RL
  update of the output layer from moving the input embeddings.
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

FORMAT_VERSION = 1  # bump when the build recipe changes in a way the config does not show
DEFAULT_SEED = 0

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = SPECIAL_TOKENS
CHARS = "\n" + "".join(chr(c) for c in range(0x20, 0x7F))  # newline + printable ASCII

DEFAULT_CONFIG = dict(
    hidden_size=128,
    # two heads of 64. Four (q/o projections 128 <-> 256) made the warm start's copying form more
    # reliably (seeds 1 and 2: 31.5% and 29.5% greedy after 600 steps; with two, seed 1 reached
    # 7% and seed 0 42.5%), but cost 1.3x per warm-start step and ~1.8x per rollout on one
    # thread, which breaks the 10-minute budget of `appo train`, and RL from those warm starts
    # lost accuracy (docs/training.md)
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=64,  # vLLM's CPU attention needs >= 64 (SPEC issue 5)
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


def vocabulary() -> dict[str, int]:
    return {token: i for i, token in enumerate(list(SPECIAL_TOKENS) + list(CHARS))}


def char_tokenizer():
    """The character-level tokenizer as a `transformers` fast tokenizer (not saved anywhere)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary()
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
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
