"""Check `tests/reference_forward.py` against Hugging Face itself (HF modules run only here, as the oracle)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from types import SimpleNamespace  # noqa: E402

from reference_forward import reference_forward, tiny_gpt2, tiny_llama, upstream_sources  # noqa: E402
from reference_forward import _layer_norm, _rms_norm, _TempSoftmax  # noqa: E402

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


# ---------------------------------------------------------------- GIM (backward-only modifications) ---------------
GIM_ALL = dict(norm_freeze=True, softmax_temperature=2.0, qkv_scale=True)
GIM_VARIANTS = {"norm_freeze": dict(norm_freeze=True), "temperature": dict(softmax_temperature=2.0),
                "temperature_low": dict(softmax_temperature=0.3), "qkv_scale": dict(qkv_scale=True), "all": GIM_ALL}


def _metric(logits, n=3):
    "Mean log-prob of the actual next token over the last `n` predicted positions of row 0 (no padding there)."
    return lambda ids: logits[0, -n - 1:-1].log_softmax(-1).gather(-1, ids[0, -n:, None]).mean()


@pytest.mark.parametrize("arch", ["gpt2_sharp", "llama_sharp"])
@pytest.mark.parametrize("variant", list(GIM_VARIANTS))
def test_gim_forward_bit_identical(arch, variant):
    "Every GIM switch (alone / together; as dict or as object) leaves the forward values untouched, bit for bit."
    model, (ids, am) = MODELS[arch](), _batch()
    plain = reference_forward(model, ids, am)
    for gim in (GIM_VARIANTS[variant], SimpleNamespace(**GIM_VARIANTS[variant])):
        out = reference_forward(model, ids, am, gim=gim)
        assert torch.equal(out["logits"], plain["logits"])
        assert all(torch.equal(out["attn_probs"][l], plain["attn_probs"][l]) for l in plain["attn_probs"])
    with torch.no_grad():  # custom Functions also work without autograd
        assert torch.equal(reference_forward(model, ids, am, gim=GIM_VARIANTS[variant])["logits"], plain["logits"])


def test_gim_rejects_unknown_keys():
    model, (ids, am) = tiny_gpt2(), _batch()
    with pytest.raises(ValueError):
        reference_forward(model, ids, am, gim=dict(norm_freez=True))


def test_gim_norm_freeze_closed_form():
    "Frozen std/rms: dL/dx = w*g/r (RMS) and (g*w - mean(g*w))/sigma (LayerNorm); differs from the true gradient."
    g_ = torch.Generator().manual_seed(0)
    x0, g, w, b = (torch.randn(2, 5, 16, generator=g_) * 3 + 1, torch.randn(2, 5, 16, generator=g_),
                   1 + 0.3 * torch.randn(16, generator=g_), torch.randn(16, generator=g_))
    eps = 1e-5

    def grad(fn, freeze):
        x = x0.clone().requires_grad_()
        y = fn(x, freeze)
        (y * g).sum().backward()
        return y.detach(), x.grad

    r = torch.sqrt(x0.pow(2).mean(-1, keepdim=True) + eps)
    sigma = torch.sqrt(x0.var(-1, unbiased=False, keepdim=True) + eps)
    closed = {"rms": w * g / r, "ln": (g * w - (g * w).mean(-1, keepdim=True)) / sigma}
    fns = {"rms": lambda x, f: _rms_norm(x, w, eps, f), "ln": lambda x, f: _layer_norm(x, w, b, eps, f)}
    for name, fn in fns.items():
        (y_plain, g_plain), (y_frozen, g_frozen) = grad(fn, False), grad(fn, True)
        assert torch.equal(y_plain, y_frozen)
        torch.testing.assert_close(g_frozen, closed[name], atol=1e-6, rtol=1e-5)
        assert not torch.allclose(g_frozen, g_plain, atol=1e-3), name


@pytest.mark.parametrize("T", [0.3, 1.0, 2.0])
def test_gim_softmax_temperature_backward(T):
    "Custom softmax: forward = torch softmax; backward = s_T*(g - <g,s_T>); T=1 is torch's gradient; masks hold."
    g_ = torch.Generator().manual_seed(0)
    x0, g = torch.randn(2, 3, 6, 7, generator=g_) * 2, torch.randn(2, 3, 6, 7, generator=g_)
    mask = torch.ones(6, 7, dtype=torch.bool).tril()  # every row keeps key 0
    x0 = x0.masked_fill(~mask, torch.finfo(x0.dtype).min)
    x, xr = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    p, pr = _TempSoftmax.apply(x, T), xr.softmax(-1)
    assert torch.equal(p, pr)
    (p * g).sum().backward()
    (pr * g).sum().backward()
    s = (x0 / T).softmax(-1)
    torch.testing.assert_close(x.grad, s * (g - (g * s).sum(-1, keepdim=True)), atol=1e-6, rtol=1e-5)
    assert torch.all(x.grad[..., ~mask] == 0)
    if T == 1.0:
        torch.testing.assert_close(x.grad, xr.grad, atol=1e-6, rtol=1e-5)
    else:
        assert not torch.allclose(x.grad, xr.grad, atol=1e-4)


def _dest_grads(model, ids, am, gim, cut_last_mlp=False):
    """dL/dx_d for every destination, via a zero leaf added to each destination input. `cut_last_mlp` detaches the
    last MLP's input, so the last layer's attention gradients see only the logits path."""
    leaves, last = {}, ("mlp", model.config.num_hidden_layers - 1)

    def cb(key, up):
        x = sum(up.values())
        leaves[key] = torch.zeros_like(x, requires_grad=True)
        return (x.detach() if cut_last_mlp and key == last else x) + leaves[key]

    out = reference_forward(model, ids, am, dest_input=cb, gim=gim)
    _metric(out["logits"])(ids).backward()
    return {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("arch", ["gpt2_sharp", "llama_sharp"])
def test_gim_qkv_scale_destination_grads(arch):
    """qkv_scale alone, last layer: q and k destination grads are exactly 0.25x, v 0.5x the plain ones (scaling by a
    power of two is exact). The logits destination is unchanged; the last MLP destination is unchanged for GPT-2
    (not gated) and exactly 0.5x for Llama (gate and up both 0.5x). Earlier layers also see the scaled gradients of
    later layers, so only the last layer is checked. For Llama the last MLP's 0.5x also feeds back into the last
    layer's heads through the residual stream, so there q/k/v are compared with that MLP's input detached."""
    model, (ids, am) = MODELS[arch](), _batch()
    cfg, l = model.config, model.config.num_hidden_layers - 1
    gated = cfg.model_type == "llama"
    plain, scaled = (_dest_grads(model, ids, am, gim) for gim in (None, dict(qkv_scale=True)))
    assert torch.equal(scaled[("logits",)], plain[("logits",)])
    assert torch.equal(scaled[("mlp", l)], 0.5 * plain[("mlp", l)] if gated else plain[("mlp", l)])
    if gated:
        plain, scaled = (_dest_grads(model, ids, am, gim, cut_last_mlp=True) for gim in (None, dict(qkv_scale=True)))
    n_kv = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    for kind, n, c in (("q", cfg.num_attention_heads, 0.25), ("k", n_kv, 0.25), ("v", n_kv, 0.5)):
        for h in range(n):
            key = (kind, l, h)
            assert plain[key].abs().sum() > 0, key
            assert torch.equal(scaled[key], c * plain[key]), key


@pytest.mark.parametrize("arch", ["gpt2_sharp", "llama_sharp"])
def test_gim_switches_change_model_grads(arch):
    "End to end: every switch changes dL/d(input embedding); softmax_temperature=1 reproduces the plain gradient."
    model, (ids, am) = MODELS[arch](), _batch()
    g = {name: _dest_grads(model, ids, am, gim)[("q", 0, 0)]
         for name, gim in dict(plain=None, t1=dict(softmax_temperature=1.0), **GIM_VARIANTS).items()}
    torch.testing.assert_close(g["t1"], g["plain"], atol=1e-6, rtol=1e-5)
    for name in GIM_VARIANTS:
        assert not torch.allclose(g[name], g["plain"], atol=1e-5, rtol=1e-3), name
