"""Independent plain-PyTorch reference forward pass for HF `GPT2LMHeadModel` and `LlamaForCausalLM`.

Ground truth for tests of the edge-level computational graph. Only the model's *parameters and config*
are read; no HF module forward is ever called. The residual stream is decomposed into source nodes
(`("input",)`, `("head", l, h)`, `("mlp", l)`) and every destination (`("q", l, h)`, `("k", l, g)`,
`("v", l, g)`, `("mlp", l)`, `("logits",)`) reads its *own* copy of the residual input, so single edges
can be patched and per-destination gradients taken via the `dest_input` callback.

Optionally (`gim=...`) applies the backward-only modifications of GIM (Edin et al. 2025, "GIM: Improved
Interpretability for Large Language Models"): frozen norm scale, temperature-adjusted softmax gradient and
q/k/v (and gate/up) gradient scaling. Forward values are unchanged bit for bit; only gradients differ.

Assumes eval mode, eager attention, float32, no KV cache, position ids = arange(T).
"""
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

__all__ = ["reference_forward", "tiny_gpt2", "tiny_llama", "upstream_sources"]


def _gelu_new(x):
    "GPT-2's tanh-approximated GELU (`gelu_new`)."
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _layer_norm(x, w, b, eps, freeze=False):
    "`freeze` (GIM): sqrt(var+eps) is a constant in the backward pass; the mean subtraction stays differentiated."
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    std = torch.sqrt(var + eps)
    return (x - mu) / (std.detach() if freeze else std) * w + b


def _rms_norm(x, w, eps, freeze=False):
    "`freeze` (GIM): the rms sqrt(mean(x^2)+eps) is a constant in the backward pass."
    x32 = x.float()
    inv_rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return w * (x32 * (inv_rms.detach() if freeze else inv_rms)).to(x.dtype)


class _TempSoftmax(torch.autograd.Function):
    """GIM softmax: forward p = softmax(x) (last dim); backward s_T * (g - <g, s_T>) with s_T = softmax(x / T).
    x is shifted by its row max before dividing, so -inf / finfo.min masked keys stay masked (weight 0)."""

    @staticmethod
    def forward(ctx, x, T):
        ctx.save_for_backward(x)
        ctx.T = T
        return x.softmax(-1)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        s = ((x - x.amax(-1, keepdim=True)) / ctx.T).softmax(-1)
        return s * (g - (g * s).sum(-1, keepdim=True)), None


class _ScaleGrad(torch.autograd.Function):
    "Identity in the forward pass; multiplies the incoming gradient by `c` in the backward pass."

    @staticmethod
    def forward(ctx, x, c):
        ctx.c = c
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * ctx.c, None


def _gim_options(gim):
    """(norm_freeze, softmax_temperature, qkv_scale) from None, a dict, or any object with those attributes.
    Missing keys/attributes mean "off"; unknown dict keys raise (catches typos)."""
    names = ("norm_freeze", "softmax_temperature", "qkv_scale")
    if gim is None:
        return False, None, False
    if isinstance(gim, dict):
        unknown = set(gim) - set(names)
        if unknown:
            raise ValueError(f"unknown gim keys {sorted(unknown)}; expected {names}")
        get = gim.get
    else:
        get = lambda n: getattr(gim, n, None)
    return bool(get("norm_freeze")), get("softmax_temperature"), bool(get("qkv_scale"))


def _add(y, b):
    return y if b is None else y + b


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _weights(model):
    """Arch-agnostic view of the weights. All matrices are in `x @ W` ([in, out]) convention.

    Returns (spec, layers): spec has d, H, Hkv, dh, rope (inv_freq or None), norm(x, w, b), embed(ids), W_U, b_U, ln_f;
    `norm(x, w, b, freeze=False)`; layers[l] has ln1, ln2 (weight, bias-or-None), Wq/Wk/Wv [d, n*dh], bq/bk/bv
    (or None), Wo [H*dh, d], bo, scale, and an `mlp(x, sg)` closure returning the post-activation hidden (input of
    c_proj/down_proj) plus Wout/bout; `sg(t, c)` scales the gradient of t by c (GIM: Llama's gate/up outputs).
    """
    cfg, sd = model.config, model.state_dict(keep_vars=True)  # keep_vars: Parameters, so grads can flow
    lin = lambda p: (sd[p + ".weight"].T, sd.get(p + ".bias"))  # nn.Linear [out,in] -> [in,out]
    out_emb = model.get_output_embeddings()
    s = dict(W_U=out_emb.weight.T, b_U=out_emb.bias)
    layers = []
    if cfg.model_type == "gpt2":
        assert cfg.activation_function == "gelu_new", cfg.activation_function
        d, H = cfg.n_embd, cfg.n_head
        s.update(d=d, H=H, Hkv=H, dh=d // H, rope=None)
        eps = cfg.layer_norm_epsilon
        s["norm"] = lambda x, w, b, freeze=False: _layer_norm(x, w, b, eps, freeze)
        s["embed"] = lambda ids: sd["transformer.wte.weight"][ids] + sd["transformer.wpe.weight"][
            torch.arange(ids.shape[1], device=ids.device)]
        s["ln_f"] = (sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"])
        for l in range(cfg.n_layer):
            p = f"transformer.h.{l}."
            Wqkv, bqkv = sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"]  # Conv1D: already [in, out]
            scale = (d // H) ** -0.5 if cfg.scale_attn_weights else 1.0
            if cfg.scale_attn_by_inverse_layer_idx:
                scale /= l + 1
            Wfc, bfc = sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"]
            layers.append(dict(
                ln1=(sd[p + "ln_1.weight"], sd[p + "ln_1.bias"]), ln2=(sd[p + "ln_2.weight"], sd[p + "ln_2.bias"]),
                Wq=Wqkv[:, :d], Wk=Wqkv[:, d:2 * d], Wv=Wqkv[:, 2 * d:],
                bq=bqkv[:d], bk=bqkv[d:2 * d], bv=bqkv[2 * d:],
                Wo=sd[p + "attn.c_proj.weight"], bo=sd[p + "attn.c_proj.bias"], scale=scale,
                mlp=lambda x, sg, Wfc=Wfc, bfc=bfc: _gelu_new(x @ Wfc + bfc),
                Wout=sd[p + "mlp.c_proj.weight"], bout=sd[p + "mlp.c_proj.bias"]))
    elif cfg.model_type == "llama":
        assert cfg.hidden_act == "silu", cfg.hidden_act
        d, H, Hkv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
        dh = getattr(cfg, "head_dim", None) or d // H
        # transformers 5.x: theta lives in config.rope_parameters["rope_theta"] (config.rope_theta is gone)
        rp = getattr(cfg, "rope_parameters", None) or {"rope_type": "default", "rope_theta": cfg.rope_theta}
        assert rp.get("rope_type", "default") == "default", rp
        inv_freq = 1.0 / (rp["rope_theta"] ** (torch.arange(0, dh, 2, dtype=torch.float) / dh))
        s.update(d=d, H=H, Hkv=Hkv, dh=dh, rope=inv_freq)
        eps = cfg.rms_norm_eps
        s["norm"] = lambda x, w, b, freeze=False: _rms_norm(x, w, eps, freeze)
        s["embed"] = lambda ids: sd["model.embed_tokens.weight"][ids]
        s["ln_f"] = (sd["model.norm.weight"], None)
        for l in range(cfg.num_hidden_layers):
            p = f"model.layers.{l}."
            (Wq, bq), (Wk, bk), (Wv, bv), (Wo, bo) = (lin(p + f"self_attn.{n}_proj") for n in "qkvo")
            (Wg, bg), (Wu, bu), (Wd, bd) = (lin(p + f"mlp.{n}_proj") for n in ("gate", "up", "down"))
            layers.append(dict(
                ln1=(sd[p + "input_layernorm.weight"], None), ln2=(sd[p + "post_attention_layernorm.weight"], None),
                Wq=Wq, Wk=Wk, Wv=Wv, bq=bq, bk=bk, bv=bv, Wo=Wo, bo=bo, scale=dh ** -0.5,
                mlp=lambda x, sg, Wg=Wg, bg=bg, Wu=Wu, bu=bu:  # GIM: gate/up output grads x0.5
                    F.silu(sg(_add(x @ Wg, bg), 0.5)) * sg(_add(x @ Wu, bu), 0.5),
                Wout=Wd, bout=bd))
    else:
        raise NotImplementedError(cfg.model_type)
    return s, layers


def upstream_sources(dest_key, n_layers, n_heads):
    """Ordered list of source keys that feed `dest_key` (same order the reference passes them)."""
    kind, L = dest_key[0], (dest_key[1] if len(dest_key) > 1 else n_layers)
    srcs = [("input",)]
    for l in range(n_layers):
        if l < L or (kind == "mlp" and l == L):
            srcs += [("head", l, h) for h in range(n_heads)]
        if l < L:
            srcs.append(("mlp", l))
    return srcs


def reference_forward(hf_model, input_ids, attention_mask=None, dest_input=None, gim=None):
    """Plain-PyTorch forward of a GPT-2 / Llama causal LM, decomposed into graph nodes.

    `dest_input(dest_key, upstream) -> x_d` (optional) chooses the residual input of each destination;
    `upstream` is a fresh OrderedDict {source_key: [B,T,d]} of the sources preceding that destination.
    Default: x_d = sum(upstream.values()), which reproduces the unmodified model.

    Returns dict(logits=[B,T,V], node_outputs={src: [B,T,d]}, dest_inputs={dest: [B,T,d]},
    attn_probs={l: [B,H,T,T]}, mlp_hidden={l: [B,T,d_mlp]}, head_z={l: [B,T,H,dh]},
    q={l: [B,T,H,dh]}, k={l: [B,T,Hkv,dh]}, v={l: [B,T,Hkv,dh]}) with q/k pre-RoPE (incl. bias).

    `gim` (optional): None, a dict, or an object with `norm_freeze: bool`, `softmax_temperature: float | None`,
    `qkv_scale: bool` (missing = off). Backward-only GIM modifications, each independent:
      norm_freeze: every LayerNorm/RMSNorm treats its std/rms as a constant (detached);
      softmax_temperature=T: attention softmax backward uses softmax(scores / T) (see `_TempSoftmax`);
      qkv_scale: gradients into each head's projected q, k (x0.25) and v (x0.5), and into Llama's gate_proj /
        up_proj outputs (x0.5), are scaled. GPT-2's MLP is not gated and is left alone.
    """
    s, layers = _weights(hf_model)
    H, Hkv, dh = s["H"], s["Hkv"], s["dh"]
    norm_freeze, temperature, qkv_scale = _gim_options(gim)
    norm = lambda x, w, b: s["norm"](x, w, b, norm_freeze)
    sg = (lambda t, c: _ScaleGrad.apply(t, c)) if qkv_scale else (lambda t, c: t)
    softmax = (lambda x: x.softmax(-1)) if temperature is None else (lambda x: _TempSoftmax.apply(x, temperature))
    B, T = input_ids.shape
    dev = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long, device=dev)
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
    allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]  # [B,1,Tq,Tk]

    upstream = OrderedDict()  # every source computed so far, in order
    out = dict(node_outputs=upstream, dest_inputs={}, attn_probs={}, mlp_hidden={}, head_z={}, q={}, k={}, v={})

    def read(key):
        "Residual input of destination `key` (its own copy)."
        x = dest_input(key, OrderedDict(upstream)) if dest_input is not None else sum(upstream.values())
        out["dest_inputs"][key] = x
        return x

    def proj(kind, l, n, W, b, ln, c):
        """Per-head projection: each head reads its own x_d, normalises it, multiplies by its weight slice.
        `c`: GIM gradient scale of the projected head (applied only with qkv_scale)."""
        heads = []
        for h in range(n):
            sl = slice(h * dh, (h + 1) * dh)
            y = norm(read((kind, l, h)), *ln) @ W[:, sl]
            heads.append(sg(y if b is None else y + b[sl], c))
        return torch.stack(heads, dim=2)  # [B,T,n,dh]

    upstream[("input",)] = s["embed"](input_ids)
    if s["rope"] is not None:
        freqs = torch.arange(T, device=dev, dtype=torch.float)[:, None] * s["rope"].to(dev)[None]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, :, None], emb.sin()[None, :, None]  # [1,T,1,dh]

    for l, P in enumerate(layers):
        q = proj("q", l, H, P["Wq"], P["bq"], P["ln1"], 0.25)
        k = proj("k", l, Hkv, P["Wk"], P["bk"], P["ln1"], 0.25)
        v = proj("v", l, Hkv, P["Wv"], P["bv"], P["ln1"], 0.5)
        out["q"][l], out["k"][l], out["v"][l] = q, k, v
        if s["rope"] is not None:
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        rep = H // Hkv  # query head h uses kv head h // rep
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * P["scale"]
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = softmax(scores.float()).to(q.dtype)
        z = torch.einsum("bhqk,bkhd->bqhd", probs, v)  # [B,T,H,dh]
        out["attn_probs"][l], out["head_z"][l] = probs, z
        for h in range(H):
            o = z[:, :, h] @ P["Wo"][h * dh:(h + 1) * dh]
            upstream[("head", l, h)] = _add(o, None if P["bo"] is None else P["bo"] / H)

        hid = P["mlp"](norm(read(("mlp", l)), *P["ln2"]), sg)
        out["mlp_hidden"][l] = hid
        upstream[("mlp", l)] = _add(hid @ P["Wout"], P["bout"])

    out["logits"] = _add(norm(read(("logits",)), *s["ln_f"]) @ s["W_U"], s["b_U"])
    return out


def _randomize_norms_and_biases(model, scale=0.1):
    "Norm weights -> 1 + scale*randn, all biases (norm and linear) -> scale*randn, so none is trivial."
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = "ln_" in name or "norm" in name
            if name.endswith(".bias"):
                p.copy_(scale * torch.randn_like(p))
            elif is_norm and name.endswith(".weight"):
                p.copy_(1 + scale * torch.randn_like(p))
    return model


def tiny_gpt2(seed=0, **overrides):
    """Random 3-layer, 4-head, d=32 GPT-2 (eager attention, eval mode, no dropout).
    `overrides` go to GPT2Config (e.g. initializer_range=0.2 for sharper, less uniform attention)."""
    torch.manual_seed(seed)
    cfg = GPT2Config(**{**dict(vocab_size=260, n_embd=32, n_layer=3, n_head=4, n_positions=128,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), **overrides})
    return _randomize_norms_and_biases(AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval())


def tiny_llama(seed=0, **overrides):
    """Random 3-layer Llama, d=32, 4 query heads, 2 kv heads (GQA), eager attention, eval mode.
    `overrides` go to LlamaConfig (e.g. initializer_range=0.2)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**dict(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
                         **overrides})
    return _randomize_norms_and_biases(AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval())
