"""Tiny random-weight transformers models (no downloads) and the check that one runs through portable_attn
as transformers' own eager path runs it: prefill logits and a greedy generation of 16 tokens for a batch of
two prompts of different lengths, left padded, fp32."""
from __future__ import annotations

import pytest
import torch

from portable_attn.conformance.tolerance import FLOOR
from portable_attn.integrations import transformers as pat

tf = pytest.importorskip("transformers")

SMALL = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MAMBA = dict(mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
             mamba_chunk_size=4)
WINDOW = 4  # shorter than the prompts, so sliding windows cut keys in prefill and in decode

# name -> (config class, config kwargs); attention-only models use a larger init so softcap and sinks bite
CONFIGS = {
    "qwen3_next": ("Qwen3NextConfig", dict(
        SMALL, head_dim=8, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=32,
        layer_types=["linear_attention", "full_attention"])),
    "mamba2": ("Mamba2Config", dict(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8, expand=2, state_size=8,
        n_groups=2, conv_kernel=4, chunk_size=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "bamba": ("BambaConfig", dict(SMALL, **MAMBA, attn_layer_indices=[1])),
    "falcon_h1": ("FalconH1Config", dict(SMALL, **MAMBA, mamba_d_ssm=64)),
    "gpt_oss": ("GptOssConfig", dict(
        SMALL, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"], initializer_range=0.3)),
    "gemma2": ("Gemma2Config", dict(
        SMALL, head_dim=8, sliding_window=WINDOW, attn_logit_softcapping=2.0, query_pre_attn_scalar=8,
        layer_types=["sliding_attention", "full_attention"], initializer_range=0.3)),
    "mistral": ("MistralConfig", dict(SMALL, head_dim=8, sliding_window=WINDOW, initializer_range=0.3)),
}

PROMPTS = (9, 5)  # tokens of the two prompts; the second is left padded
NEW_TOKENS = 16


def build(name: str, seed: int = 0):
    """The tiny model `name` with random weights, eager attention, fp32, in eval mode."""
    cls, kwargs = CONFIGS[name]
    config = getattr(tf, cls)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = None  # always 16 new tokens
    model.generation_config.pad_token_id = 0
    return model


def prompts(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(PROMPTS), max(PROMPTS), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(PROMPTS):
        ids[row, -n:] = torch.randint(3, 100, (n,), generator=gen)
        mask[row, -n:] = 1
    return ids, mask


def run(model, ids, mask, new_tokens: int = NEW_TOKENS):
    """(prefill logits at the prompts' real tokens, generated ids, logits of each generation step)."""
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    return logits, out.sequences, torch.stack(out.logits)


def assert_close(got, want, what: str):
    assert not torch.isnan(got).any(), f"{what}: NaN"
    tol = FLOOR[torch.float32] * max(1.0, float(want.abs().max()))
    err = float((got - want).abs().max())
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


def check_model(name: str, backend: str, eager=None, new_tokens: int = NEW_TOKENS):
    """Run `name` through portable_attn on `backend` and compare with its eager run (made here if not given)."""
    model = build(name)
    ids, mask = prompts()
    eager = eager or run(model, ids, mask, new_tokens)
    with pat.patch(model, backend=backend) as patched:
        assert model.config._attn_implementation == pat.NAME
        got = run(model, ids, mask, new_tokens)
    assert model.config._attn_implementation == "eager"
    assert_close(got[0], eager[0], f"{name} on {backend}: prefill logits")
    assert torch.equal(got[1], eager[1]), f"{name} on {backend}: generated tokens differ"
    assert_close(got[2], eager[2], f"{name} on {backend}: generation logits")
    return patched
