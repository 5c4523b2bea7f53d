"""A real Llama whose weights make it write tool calls, for the rollout tests.

A random model almost never writes `<e>ab</e>`, so the tool loop would go untested. Here the
embedding rows are random unit-RMS vectors and the output layer is built from them so that the
logits after character x favour chosen successors (a bigram table), following the script

    ab<e>ab</e>  ->  the tool runs, `<result>...</result>` is appended, and `ab<e>...` goes on

with about 3% of the tokens off-script (every other token keeps logit 0), so samples differ. The
attention and MLP weights stay random (scaled by `mixing`), so every logit also depends on the
context through the KV cache: a cache handled wrongly changes the log-probs.
"""

import torch
import transformers

from appo.models import EOS, char_tokenizer, vocabulary

TOOL = "e"  # the tool name the script calls
# character -> {successor: logit}; "<" opens a call or a closing tag with about equal odds
SCRIPT = {"<": {TOOL: 7.3, "/": 7.6}, "/": {TOOL: 8.0}, TOOL: {">": 8.0}, ">": {"a": 8.0},
          "a": {"b": 8.0}, "b": {"<": 8.0, EOS: 3.5}}


def scripted_llama(hidden=64, layers=2, mixing=1.0, seed=0, script=SCRIPT, vocab=None):
    """`vocab`: token -> id (default the character vocabulary); `script` names tokens by it."""
    vocab = vocabulary(tags=False) if vocab is None else vocab
    config = transformers.LlamaConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
        head_dim=hidden // 2, max_position_embeddings=1024, tie_word_embeddings=False,
        pad_token_id=vocab["<pad>"], bos_token_id=vocab["<bos>"], eos_token_id=vocab[EOS])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config).float().eval()
        table = torch.zeros(len(vocab), len(vocab))  # [successor, character]
        for x, successors in script.items():
            for y, logit in successors.items():
                table[vocab[y], vocab[x]] = logit
        with torch.no_grad():
            embed = torch.randn(len(vocab), hidden)
            embed /= embed.pow(2).mean(1, keepdim=True).sqrt()  # unit RMS: RMSNorm leaves it be
            model.model.embed_tokens.weight.copy_(embed)
            # logits(y | x) = table[y] . (embed @ embed[x]) / hidden ~ table[y, x]
            model.lm_head.weight.copy_(table @ embed / hidden)
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.mul_(mixing)
                layer.mlp.down_proj.weight.mul_(mixing)
    return model


def tokenizer():
    return char_tokenizer(tags=False)
