"""Benchmark grid of whole Mamba language models (statescan.nn.MambaLM, random weights):
prefill of a prompt and greedy decoding, in tokens.

Models: Mamba-130m-shaped (d_model 768, 24 layers, vocab 50280, N=16) and Mamba-2-130m-shaped
(d_model 768, 24 layers, 24 heads of 64, N=128, one group); the quick grid uses a 4-layer,
d_model 256 model of each kind.

Peers: Hugging Face transformers' ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` on CPU with
the same weights ("transformers": its forward for prefill, its ``generate`` for decoding).
Decode cases also run "weight-streaming": one float32 (float64) GEMV over a matrix holding as
many bytes as the weights a decoding step reads (every mixer weight, the norms and the
lm_head), i.e. the time per token of a decoder bound by reading its weights once; its ratio
column is the fraction of that limit statescan reaches.
"""
import numpy as np

from .core import STATESCAN, Case, Runner, add_peer, import_peer

MODELS = {
    "mamba-130m": dict(model_type="mamba", vocab_size=50280, hidden_size=768,
                       num_hidden_layers=24, state_size=16, conv_kernel=4, expand=2),
    "mamba2-130m": dict(model_type="mamba2", vocab_size=50288, hidden_size=768,
                        num_hidden_layers=24, state_size=128, conv_kernel=4, expand=2,
                        head_dim=64, n_groups=1, chunk_size=256, tie_word_embeddings=True),
    "mamba-small": dict(model_type="mamba", vocab_size=8192, hidden_size=256,
                        num_hidden_layers=4, state_size=16, conv_kernel=4, expand=2),
    "mamba2-small": dict(model_type="mamba2", vocab_size=8192, hidden_size=256,
                         num_hidden_layers=4, state_size=64, conv_kernel=4, expand=2,
                         head_dim=64, n_groups=1, chunk_size=256, tie_word_embeddings=True),
}
_FULL = (("mamba-130m", 512, 32), ("mamba2-130m", 512, 32))      # (model, prefill T, decode n)
_QUICK = (("mamba-small", 64, 8), ("mamba2-small", 64, 8))
_WEIGHT_STREAMING = "weight-streaming"


def cases(quick):
    out = []
    for dtype in ("float32", "float64"):
        for model, T, n in (_QUICK if quick else _FULL):
            out.append(_case(model, "prefill", T, dtype))
            out.append(_case(model, "decode", n, dtype))
    return out


def _case(model, kind, steps, dtype):
    flops = 2.0 * _weight_count(MODELS[model]) * steps     # the GEMMs / GEMVs dominate
    params = {"model": model, ("T" if kind == "prefill" else "tokens"): steps}
    # transformers computes parts of a float64 model in float32 (dt, norms, logits)
    return Case("mamba", f"lm-{kind}", params, dtype, steps, flops,
                lambda: _make(model, kind, steps, dtype),
                atol=1e-5 if dtype == "float64" else None)


def _weight_count(cfg):
    """Weights read per token: every mixer weight, the norms and the lm_head (the embedding
    lookup reads one row)."""
    d, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    di, N, K = cfg["expand"] * d, cfg["state_size"], cfg["conv_kernel"]
    if cfg["model_type"] == "mamba":
        R = -(-d // 16)
        mixer = 2 * di * d + di * K + di + (R + 2 * N) * di + di * R + di + di * N + di + d * di
    else:
        H, GN = di // cfg["head_dim"], cfg["n_groups"] * N
        conv = di + 2 * GN
        mixer = (2 * di + 2 * GN + H) * d + conv * K + conv + 3 * H + di + d * di
    return L * (mixer + d) + d + V * d


def _make(model, kind, steps, dtype):
    from statescan import nn
    cfg = MODELS[model]
    lm = nn.MambaLM(cfg, dtype=dtype, seed=0)
    rng = np.random.default_rng(1)
    if kind == "prefill":
        ids = rng.integers(0, cfg["vocab_size"], (1, steps))
        runners = {STATESCAN: lambda: lm(ids)[0]}
        add_peer(runners, "transformers", _hf_prefill, lm, cfg, dtype, ids)
        return runners
    prompt = rng.integers(0, cfg["vocab_size"], (1, 1))
    runners = {STATESCAN: lambda: lm.generate(prompt, max_new_tokens=steps)}
    add_peer(runners, "transformers", _hf_generate, lm, cfg, dtype, prompt, steps)
    runners[_WEIGHT_STREAMING] = _weight_streaming(_weight_count(cfg), dtype)
    return runners


def _weight_streaming(count, dtype):
    """One GEMV over `count` weights (a [count / 4096, 4096] matrix): the time per token of
    a decoder that only reads its weights."""
    cols = 4096
    W = np.random.default_rng(2).standard_normal((count // cols, cols)).astype(dtype)
    v = np.ones(cols, dtype)
    out = np.empty(W.shape[0], dtype)

    def run():
        np.matmul(W, v, out=out)
    return Runner(run, steps=1, flops=2.0 * W.size)


def _hf_model(lm, cfg, dtype):
    torch = import_peer("torch")
    transformers = import_peer("transformers")
    fields = {k: v for k, v in cfg.items() if k != "model_type"}
    if cfg["model_type"] == "mamba":
        config = transformers.MambaConfig(**fields, pad_token_id=None, bos_token_id=None,
                                          eos_token_id=None)
        model = transformers.MambaForCausalLM(config)
    else:
        fields["num_heads"] = cfg["expand"] * cfg["hidden_size"] // cfg["head_dim"]
        config = transformers.Mamba2Config(**fields, pad_token_id=None, bos_token_id=None,
                                           eos_token_id=None)
        model = transformers.Mamba2ForCausalLM(config)
    state = {k: torch.from_numpy(np.array(v)) for k, v in lm.state_dict().items()}
    model = model.to(getattr(torch, dtype))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weights do not fit transformers' model: {missing} {unexpected}")
    return torch, model.eval()


def _hf_prefill(lm, cfg, dtype, ids):
    torch, model = _hf_model(lm, cfg, dtype)
    t_ids = torch.from_numpy(ids)

    def run():
        with torch.no_grad():
            return model(t_ids).logits
    return run


def _hf_generate(lm, cfg, dtype, prompt, n):
    torch, model = _hf_model(lm, cfg, dtype)
    t_prompt = torch.from_numpy(prompt)
    mask = torch.ones_like(t_prompt)

    def run():
        with torch.no_grad():
            return model.generate(t_prompt, attention_mask=mask, max_new_tokens=n,
                                  do_sample=False).numpy()
    return run
