"""Every `ArchSpec` read equals an independent plain-PyTorch computation (tests/reference_forward.py)."""
import pytest
import torch

from conftest import padded_batch
from reference_forward import reference_forward

ATOL = 1e-5


def spec_reads(lm, batch):
    "All per-layer reads through nnsight, in execution order."
    model, spec = lm.model, lm.spec
    reads = {k: [] for k in ("pre", "q", "k", "v", "z", "pattern", "mid", "mlp_post", "mlp_out", "post")}
    with torch.no_grad(), model.trace(batch.input_ids, attention_mask=batch.attention_mask):
        for l in range(spec.n_layers):
            reads["pre"].append(spec.resid_pre(model, l).save())
            for key, t in zip("qkv", spec.qkv(model, l)): reads[key].append(t.save())
            reads["z"].append(spec.z(model, l).save())
            reads["pattern"].append(spec.pattern(model, l).save())
            reads["mid"].append(spec.resid_mid(model, l).save())
            reads["mlp_post"].append(spec.mlp_post(model, l).save())
            reads["mlp_out"].append(spec.mlp_out(model, l).save())
            reads["post"].append(spec.resid_post(model, l).save())
        final = spec.resid_final(model).save()
    return reads, final


def test_reads_match_reference(lm):
    b = padded_batch(lm)
    reads, final = spec_reads(lm, b)
    ref = reference_forward(lm.hf, b.input_ids, b.attention_mask)
    keep = b.attention_mask.bool()
    spec = lm.spec
    for l in range(spec.n_layers):
        nodes = ref["node_outputs"]
        before_attn = ref["dest_inputs"][("q", l, 0)]
        before_mlp = ref["dest_inputs"][("mlp", l)]
        after = before_mlp + nodes[("mlp", l)]
        torch.testing.assert_close(reads["pre"][l][keep], before_attn[keep], atol=ATOL, rtol=0)
        torch.testing.assert_close(reads["mid"][l][keep], before_mlp[keep], atol=ATOL, rtol=0)
        torch.testing.assert_close(reads["post"][l][keep], after[keep], atol=ATOL, rtol=0)
        for key in "qkv":
            torch.testing.assert_close(reads[key][l][keep], ref[key][l][keep], atol=ATOL, rtol=0)
        assert reads["k"][l].shape[-2] == spec.n_kv_heads and reads["q"][l].shape[-2] == spec.n_heads
        torch.testing.assert_close(reads["z"][l][keep], ref["head_z"][l][keep], atol=ATOL, rtol=0)
        torch.testing.assert_close(reads["mlp_post"][l][keep], ref["mlp_hidden"][l][keep], atol=ATOL, rtol=0)
        torch.testing.assert_close(reads["mlp_out"][l][keep], nodes[("mlp", l)][keep], atol=ATOL, rtol=0)
        # attention rows of real query positions, over real keys
        for bi in range(len(b)):
            n = int(b.attention_mask[bi].sum())
            torch.testing.assert_close(reads["pattern"][l][bi, :, :n, :n], ref["attn_probs"][l][bi, :, :n, :n],
                                       atol=ATOL, rtol=0)
    torch.testing.assert_close(final[keep], ref["dest_inputs"][("logits",)][keep], atol=ATOL, rtol=0)


def test_weight_accessors_rebuild_projections(lm):
    "W_QKV/b_QKV applied to the normed residual give the projections; apply_norm equals the module."
    b = padded_batch(lm)
    ref = reference_forward(lm.hf, b.input_ids, b.attention_mask)
    spec, hf = lm.spec, lm.hf
    for l in range(spec.n_layers):
        x = ref["dest_inputs"][("q", l, 0)]
        norm = spec.norm_module(hf, "attn", l)
        with torch.no_grad():
            xn = spec.apply_norm(norm, x)
            torch.testing.assert_close(xn, norm(x), atol=ATOL, rtol=0)
            for W, bias, key in zip(spec.W_QKV(hf, l), spec.b_QKV(hf, l), "qkv"):
                y = torch.einsum("btm,hmk->bthk", xn, W)
                y = y if bias is None else y + bias
                torch.testing.assert_close(y, ref[key][l], atol=ATOL, rtol=0)


@pytest.mark.slow
def test_embedded_model_reads_match_hooks():
    "On SmolLM2-135M: nnsight reads equal plain forward hooks / output_* of the HF model."
    from summcircuit.data import build_prompt, collate, load_aclsum
    from summcircuit.models import load_model
    lm = load_model("smollm2-135m", device="cpu")
    assert (lm.spec.n_layers, lm.spec.n_heads, lm.spec.n_kv_heads) == (30, 9, 3)
    prompts = [build_prompt(e, lm.tokenizer, max_source_tokens=48) for e in load_aclsum("val", n=2)]
    b = collate(prompts, lm.tokenizer.pad_token_id)
    reads, final = spec_reads(lm, b)
    hooked = {}
    layers = lm.hf.model.layers
    hooks = []
    for l in (0, 14, 29):
        hooks.append(layers[l].self_attn.o_proj.register_forward_hook(
            lambda m, i, o, l=l: hooked.__setitem__(("z", l), i[0])))
        hooks.append(layers[l].mlp.down_proj.register_forward_hook(
            lambda m, i, o, l=l: hooked.__setitem__(("mlp_post", l), i[0])))
        hooks.append(layers[l].mlp.register_forward_hook(lambda m, i, o, l=l: hooked.__setitem__(("mlp_out", l), o)))
        hooks.append(layers[l].self_attn.k_proj.register_forward_hook(lambda m, i, o, l=l: hooked.__setitem__(("k", l), o)))
    with torch.no_grad():
        out = lm.hf(b.input_ids, attention_mask=b.attention_mask, output_attentions=True, output_hidden_states=True)
    for h in hooks: h.remove()
    keep = b.attention_mask.bool()
    for l in (0, 14, 29):
        torch.testing.assert_close(reads["pre"][l][keep], out.hidden_states[l][keep], atol=ATOL, rtol=0)
        torch.testing.assert_close(reads["z"][l].flatten(-2)[keep], hooked[("z", l)][keep], atol=ATOL, rtol=0)
        torch.testing.assert_close(reads["k"][l].flatten(-2)[keep], hooked[("k", l)][keep], atol=ATOL, rtol=0)
        torch.testing.assert_close(reads["mlp_post"][l][keep], hooked[("mlp_post", l)][keep], atol=ATOL, rtol=0)
        torch.testing.assert_close(reads["mlp_out"][l][keep], hooked[("mlp_out", l)][keep], atol=ATOL, rtol=0)
        torch.testing.assert_close(reads["pattern"][l], out.attentions[l], atol=ATOL, rtol=0)
    torch.testing.assert_close(lm.spec.apply_norm(lm.hf.model.norm, final), out.hidden_states[-1], atol=ATOL, rtol=0)
