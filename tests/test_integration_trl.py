"""appo inside TRL (docs/integration.md, TRL): `add_appo_lm_head` against TRL's own fused LM head
on a tiny Llama, and whole GRPOTrainer steps on the CPU with either head. TRL is a test
dependency: these tests never skip."""

import copy
import importlib

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import appo_kernels.integrations.trl as appo_trl
from appo.models import char_tokenizer
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import add_fused_lm_head

TEMPERATURE = 0.7


def tiny_llama(vocab=97, **config):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **config))


def batch(vocab=97):
    ids = torch.randint(0, vocab, (3, 12))
    attention = torch.ones_like(ids)
    attention[1, :3] = 0  # left padding
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :5] = -100  # the prompt
    return dict(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)


def test_the_appo_head_equals_trls_and_float64():
    trl_model = tiny_llama()
    appo_model = copy.deepcopy(trl_model)
    add_fused_lm_head(trl_model, temperature=TEMPERATURE, outputs=("log_probs", "entropy"))
    assert appo_trl.add_appo_lm_head(appo_model, temperature=TEMPERATURE,
                                     outputs=("log_probs", "entropy"))
    inputs = batch()
    theirs, ours = trl_model(**inputs), appo_model(**inputs)
    mask = inputs["labels"][:, 1:] != -100
    assert torch.equal(ours.label_mask, mask)
    for name in ("log_probs", "entropy"):
        assert getattr(ours, name).dtype == torch.float32
        assert bool((getattr(ours, name)[~mask] == 0).all())
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=0,
                                   atol=2e-6, msg=name)
    torch.testing.assert_close(ours.loss, theirs.loss)
    # and both against float64 statistics of the model's own logits
    with torch.no_grad():
        logits = appo_model(input_ids=inputs["input_ids"],
                            attention_mask=inputs["attention_mask"]).logits[:, :-1].double()
    log_p = torch.log_softmax(logits / TEMPERATURE, -1)
    want = log_p.gather(-1, inputs["labels"][:, 1:].clamp(min=0)[..., None])[..., 0]
    assert float((ours.log_probs.detach().double() - want)[mask].abs().max()) < 2e-5
    entropy = -(log_p.exp() * log_p).sum(-1)
    assert float((ours.entropy.detach().double() - entropy)[mask].abs().max()) < 2e-5
    # gradients through the whole model agree too
    (theirs.log_probs.sum() + 0.3 * theirs.entropy.sum()).backward()
    (ours.log_probs.sum() + 0.3 * ours.entropy.sum()).backward()
    for (name, a), b in zip(appo_model.named_parameters(), trl_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_other_calls_run_the_model_as_before():
    model = tiny_llama()
    plain = copy.deepcopy(model)
    appo_trl.add_appo_lm_head(model)
    inputs = batch()
    del inputs["fused_lm_head"]
    ours, theirs = model(**inputs), plain(**inputs)
    assert torch.equal(ours.logits, theirs.logits) and torch.equal(ours.loss, theirs.loss)


@pytest.mark.parametrize("outputs, config, why", [
    (("log_probs", "is_top1"), {}, "outputs \\['is_top1'\\]"),
    (("log_probs",), {"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0"),
])
def test_what_appo_does_not_compute_keeps_trls_head(outputs, config, why):
    model = tiny_llama()
    model.config.update(config)
    with pytest.warns(UserWarning, match=why):
        assert not appo_trl.add_appo_lm_head(model, outputs=outputs)
    out = model(**batch())
    assert out.log_probs is not None  # TRL's head answers
    if "is_top1" in outputs:
        assert out.is_top1 is not None


# ------------------------------------------------------------------------------------------------
# GRPOTrainer on the CPU


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = char_tokenizer(tags=False)
    model = tiny_llama(len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def code_sum(completions, **_):
    """A reward that differs between the random model's completions: a learning signal."""
    return [float(sum(map(ord, text)) % 7) for text in completions]


def grpo_step(model_dir, out_dir, patch, tree=True):
    """One GRPO step (4 prompts × 2 completions, KL to the reference): the trainer's model after
    it and its logs."""
    from datasets import Dataset

    args = GRPOConfig(output_dir=str(out_dir), per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=6, max_steps=1, use_cpu=True, report_to=[],
                      logging_steps=1, save_strategy="no", beta=0.04, learning_rate=1e-2,
                      temperature=TEMPERATURE, seed=0, bf16=False)
    data = Dataset.from_dict({"prompt": ["1+1=", "2+3=", "4+4=", "7+1="]})
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=code_sum, args=args,
                          train_dataset=data, processing_class=char_tokenizer(tags=False))
    if patch == "instance":
        appo_trl.apply_appo_kernels_to_trl(trainer, tree=tree)
    trainer.train()
    return trainer.model, trainer.state.log_history[0]


@pytest.fixture
def restore_trl(monkeypatch):
    """TRL's own head in TRL's trainer modules during the test (apply_appo_kernels_to_trl() may
    have patched them before, e.g. in docs/integration.md's example) and after it."""
    for name in appo_trl.TRAINER_MODULES:
        module = importlib.import_module(f"trl.trainer.{name}")
        monkeypatch.setattr(module, "add_fused_lm_head", add_fused_lm_head)


@pytest.mark.parametrize("patch, tree", [("class", True), ("instance", True),
                                         ("instance", False)])
def test_a_grpo_step_with_appos_head_equals_trls(model_dir, tmp_path, monkeypatch, restore_trl,
                                                  patch, tree):
    """tree: the rows of each scoring call (2 completions of each prompt, left-padded prompts,
    right-padded completions) as one packed tree; else padded as TRL runs them."""
    scored = {"flat": 0, "tree": 0}
    for kind, name in (("flat", "_scored"), ("tree", "_tree_scored")):
        real = getattr(appo_trl, name)

        def counted(*a, kind=kind, real=real):
            scored[kind] += 1
            return real(*a)
        monkeypatch.setattr(appo_trl, name, counted)
    theirs, their_logs = grpo_step(model_dir, tmp_path / "trl", patch=None)
    assert scored == {"flat": 0, "tree": 0}
    if patch == "class":
        appo_trl.apply_appo_kernels_to_trl(GRPOTrainer, tree=tree)
    ours, our_logs = grpo_step(model_dir, tmp_path / "appo", patch=patch, tree=tree)
    # the policy's scoring and the reference's went through appo, packed or not
    assert scored["tree" if tree else "flat"] >= 2 and scored["flat" if tree else "tree"] == 0
    assert our_logs["reward_std"] > 0  # the step had a learning signal
    for key in ("loss", "entropy", "kl", "reward"):
        assert our_logs[key] == pytest.approx(their_logs[key], rel=1e-4, abs=1e-6), key
    moved = 0.0
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
        moved = max(moved, float((a - b).abs().max()))
    initial = LlamaForCausalLM.from_pretrained(model_dir)
    assert max(float((a - b).abs().max()) for a, b in
               zip(ours.parameters(), initial.parameters())) > 100 * max(moved, 1e-7)


def shared_prompt_batch(vocab=97):
    """Two prompts (one left-padded) with 3 completions each, some right-padded: GRPO's rows."""
    g = torch.Generator().manual_seed(1)
    width, rows = 14, []
    for prompt_len in (6, 4):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
        for completion_len in (8, 5, 8):
            completion = torch.randint(0, vocab, (completion_len,), generator=g).tolist()
            pad_left = 6 - prompt_len
            rows.append((pad_left, prompt + completion))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for b, (left, tokens) in enumerate(rows):
        ids[b, left:left + len(tokens)] = torch.tensor(tokens)
        attention[b, left:left + len(tokens)] = 1
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :6] = -100  # the prompts
    return dict(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_tree_packed_head_equals_trls(monkeypatch, checkpointing):
    """The rows of one call merged into a tree (each prompt once): log-probs, entropy and
    gradients equal TRL's padded head to fp32 rounding, with gradient checkpointing too (its
    recomputation replays the tree call after the call has returned)."""
    trl_model = tiny_llama()
    appo_model = copy.deepcopy(trl_model)
    add_fused_lm_head(trl_model, temperature=TEMPERATURE, outputs=("log_probs", "entropy"))
    assert appo_trl.add_appo_lm_head(appo_model, temperature=TEMPERATURE,
                                     outputs=("log_probs", "entropy"))
    for model in (trl_model, appo_model):
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
    packed = []
    real = appo_trl._tree_scored
    monkeypatch.setattr(appo_trl, "_tree_scored", lambda *a: packed.append(a[1]) or real(*a))
    inputs = shared_prompt_batch()
    theirs, ours = trl_model(**inputs), appo_model(**inputs)
    assert len(packed) == 1  # one tree for the whole call
    mask = inputs["labels"][:, 1:] != -100
    assert torch.equal(ours.label_mask, mask)
    for name in ("log_probs", "entropy"):
        assert bool((getattr(ours, name)[~mask] == 0).all())
        torch.testing.assert_close(getattr(ours, name)[mask], getattr(theirs, name)[mask],
                                   rtol=0, atol=5e-6, msg=name)
    (theirs.log_probs.sum() + 0.3 * theirs.entropy.sum()).backward()
    (ours.log_probs.sum() + 0.3 * ours.entropy.sum()).backward()
    for (name, a), b in zip(appo_model.named_parameters(), trl_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
    # a call the tree cannot take exactly (positions passed) runs padded, still appo's head
    flat = appo_model(**inputs, position_ids=torch.arange(14)[None].expand(6, -1))
    assert len(packed) == 1
    torch.testing.assert_close(flat.log_probs[mask], ours.log_probs[mask], rtol=0, atol=5e-6)
    # generation and plain calls still run sdpa
    plain = appo_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    reference = trl_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    torch.testing.assert_close(plain.logits, reference.logits)


def test_the_tree_packed_head_under_bf16_autocast():
    """TRL scores under the accelerator's autocast: the tree call runs in bfloat16 like the padded
    one, both within bfloat16 rounding of the float32 values."""
    model = tiny_llama()
    padded = copy.deepcopy(model)
    exact = copy.deepcopy(model)
    outputs = ("log_probs", "entropy")
    appo_trl.add_appo_lm_head(model, TEMPERATURE, outputs=outputs)
    appo_trl.add_appo_lm_head(padded, TEMPERATURE, outputs=outputs, tree=False)
    appo_trl.add_appo_lm_head(exact, TEMPERATURE, outputs=outputs)
    inputs = shared_prompt_batch()
    mask = inputs["labels"][:, 1:] != -100
    want = exact(**inputs)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        tree, flat = model(**inputs), padded(**inputs)
    for name in outputs:
        a, b, c = (getattr(o, name)[mask] for o in (tree, flat, want))
        assert a.dtype == torch.float32
        gap_tree, gap_flat = float((a - c).abs().max()), float((b - c).abs().max())
        assert gap_tree < 0.1 and gap_flat < 0.1, (name, gap_tree, gap_flat)
        assert gap_tree > 0  # it did run in bfloat16
