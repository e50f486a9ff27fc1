"""Check `tests/reference_forward.py` against Hugging Face itself (HF modules run only here, as the oracle)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from reference_forward import reference_forward, tiny_gpt2, tiny_llama, upstream_sources  # noqa: E402

MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "gpt2_sharp": lambda: tiny_gpt2(initializer_range=0.2),
          "llama_sharp": lambda: tiny_llama(initializer_range=0.2)}
ATOL = {"gpt2": 1e-5, "llama": 1e-5, "gpt2_sharp": 1e-4, "llama_sharp": 1e-4}  # sharp: larger activations


def _batch(T=9, seed=1):
    "Right-padded batch of two sequences, lengths T and T-4."
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 260, (2, T), generator=g)
    am = torch.ones(2, T, dtype=torch.long)
    am[1, T - 4:] = 0
    ids[1, T - 4:] = 0
    return ids, am


def _names(model):
    "Module names (per layer) of the HF pieces we observe with hooks."
    if model.config.model_type == "gpt2":
        p = "transformer.h.{}."
        return dict(ln2=p + "ln_2", o=p + "attn.c_proj", down=p + "mlp.c_proj", attn=p + "attn", ln_f="transformer.ln_f")
    p = "model.layers.{}."
    return dict(ln2=p + "post_attention_layernorm", o=p + "self_attn.o_proj", down=p + "mlp.down_proj",
                attn=p + "self_attn", q=p + "self_attn.q_proj", k=p + "self_attn.k_proj", v=p + "self_attn.v_proj",
                ln_f="model.norm")


def _hf_run(model, ids, am, names):
    "Run HF once, recording input[0]/output of the named submodules (forward hooks only observe)."
    rec, hooks = {}, []
    for n in names:
        def hook(mod, args, out, n=n):
            rec[n] = (args[0] if args else None, out[0] if isinstance(out, tuple) else out)
        hooks.append(model.get_submodule(n).register_forward_hook(hook))
    try:
        with torch.no_grad():
            o = model(ids, attention_mask=am, output_attentions=True, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    return o, rec


@pytest.fixture(params=list(MODELS))
def setup(request):
    model = MODELS[request.param]()
    ids, am = _batch()
    L = model.config.num_hidden_layers
    names = _names(model)
    layer_names = [v.format(l) for k, v in names.items() if k != "ln_f" for l in range(L)] + [names["ln_f"]]
    hf, rec = _hf_run(model, ids, am, layer_names)
    with torch.no_grad():
        ref = reference_forward(model, ids, am)
    return dict(model=model, ids=ids, am=am, hf=hf, rec=rec, ref=ref, names=names, L=L,
                atol=ATOL[request.param], valid=am.bool())


def test_logits(setup):
    s = setup
    torch.testing.assert_close(s["ref"]["logits"][s["valid"]], s["hf"].logits[s["valid"]], atol=s["atol"], rtol=0)


def test_attention_probs(setup):
    s = setup
    for l in range(s["L"]):
        ref, hf = s["ref"]["attn_probs"][l], s["hf"].attentions[l]
        assert ref.shape == hf.shape
        m = s["valid"][:, None, :, None].expand_as(hf)  # valid query rows
        torch.testing.assert_close(ref[m], hf[m], atol=1e-6, rtol=0)


def test_dest_inputs_match_residual_stream(setup):
    s = setup
    ref, hf, rec, nm, v, tol = s["ref"], s["hf"], s["rec"], s["names"], s["valid"], dict(atol=s["atol"], rtol=0)
    cfg = s["model"].config
    for l in range(s["L"]):
        for h in range(cfg.num_attention_heads):
            torch.testing.assert_close(ref["dest_inputs"][("q", l, h)][v], hf.hidden_states[l][v], **tol)
        for g in range(getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)):
            for kind in "kv":
                torch.testing.assert_close(ref["dest_inputs"][(kind, l, g)][v], hf.hidden_states[l][v], **tol)
        torch.testing.assert_close(ref["dest_inputs"][("mlp", l)][v], rec[nm["ln2"].format(l)][0][v], **tol)
    x_f, normed_f = rec[nm["ln_f"]]
    torch.testing.assert_close(ref["dest_inputs"][("logits",)][v], x_f[v], **tol)
    # transformers 5.x: the last hidden_states entry is AFTER the final norm
    torch.testing.assert_close(normed_f[v], hf.hidden_states[-1][v], atol=0, rtol=0)


def test_intermediates(setup):
    "head_z = input of c_proj/o_proj; mlp_hidden = input of mlp c_proj/down_proj; heads sum to attn output; q/k/v."
    s = setup
    ref, rec, nm, v, tol = s["ref"], s["rec"], s["names"], s["valid"], dict(atol=s["atol"], rtol=0)
    H = s["model"].config.num_attention_heads
    for l in range(s["L"]):
        z = ref["head_z"][l]
        torch.testing.assert_close(z.flatten(2)[v], rec[nm["o"].format(l)][0][v], **tol)
        torch.testing.assert_close(ref["mlp_hidden"][l][v], rec[nm["down"].format(l)][0][v], **tol)
        heads = sum(ref["node_outputs"][("head", l, h)] for h in range(H))
        torch.testing.assert_close(heads[v], rec[nm["attn"].format(l)][1][v], **tol)
        if "q" in nm:  # Llama: separate projections (outputs are pre-RoPE)
            for kind in "qkv":
                torch.testing.assert_close(ref[kind][l].flatten(2)[v], rec[nm[kind].format(l)][1][v], **tol)


def test_upstream_order_and_identity_callback(setup):
    "The callback sees exactly the documented sources, in order; returning their sum changes nothing."
    s = setup
    cfg, seen = s["model"].config, {}

    def cb(key, up):
        seen[key] = list(up)
        return sum(up.values())

    with torch.no_grad():
        out = reference_forward(s["model"], s["ids"], s["am"], dest_input=cb)
    for key, srcs in seen.items():
        assert srcs == upstream_sources(key, s["L"], cfg.num_attention_heads), key
    assert set(seen) == set(s["ref"]["dest_inputs"])
    torch.testing.assert_close(out["logits"], s["ref"]["logits"], atol=0, rtol=0)


def test_patch_all_edges_from_input_and_grads(setup):
    """Patching the ("input",) edge into every destination with a corrupted run's embedding reproduces HF on the
    corrupted tokens. Adding a zero leaf per destination gives dL/dx_d through every path (a detached leaf
    would cut the paths that run through later destinations)."""
    s = setup
    model, am = s["model"], s["am"]
    corrupt = s["ids"].roll(1, dims=1)
    with torch.no_grad():
        emb_c = reference_forward(model, corrupt, am)["node_outputs"][("input",)]
        hf_c = model(corrupt, attention_mask=am).logits
    leaves = {}

    def cb(key, up):
        up[("input",)] = emb_c
        leaves[key] = torch.zeros_like(emb_c, requires_grad=True)
        return sum(up.values()) + leaves[key]

    out = reference_forward(model, s["ids"], am, dest_input=cb)
    torch.testing.assert_close(out["logits"][s["valid"]], hf_c[s["valid"]], atol=s["atol"], rtol=0)
    out["logits"][s["valid"]].logsumexp(-1).sum().backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in leaves.values())
