"""statescan.nn.Mamba / Mamba2 / MambaLM without transformers: the blocks against a float64
numpy transcription of the block math (written out here, step by step), token-by-token
decoding against prefill, variable lengths, parameters, pickling, generation, and bad
checkpoints."""
import json
import math
import pickle

import numpy as np
import pytest

import statescan as ss
from statescan import nn

# ---- float64 numpy transcription of the mixers (the definition these tests compare to) -----


def _silu(v):
    return v / (1 + np.exp(-v))


def _softplus(v):
    return np.log1p(np.exp(-np.abs(v))) + np.maximum(v, 0)


def _conv(xc, weight, bias):
    """Causal depthwise conv of xc [B, T, C] with weight [C, 1, K] from a zero window."""
    B, T, C = xc.shape
    K = weight.shape[-1]
    padded = np.concatenate([np.zeros((B, K - 1, C)), xc], axis=1)
    out = np.zeros((B, T, C)) if bias is None else np.broadcast_to(bias, (B, T, C)).copy()
    for j in range(K):
        out += weight[:, 0, j] * padded[:, j:j + T]
    return out


def _lin(v, p, name):
    out = v @ p[name + ".weight"].T
    if name + ".bias" in p:
        out = out + p[name + ".bias"]
    return out


def ref_mamba(p, u):
    """Mamba-1 mixer on u [B, T, d] with parameters p (HF names), float64."""
    Di = p["D"].shape[0]
    N = p["A_log"].shape[1]
    R = p["dt_proj.weight"].shape[1]
    xz = _lin(u, p, "in_proj")
    x, z = xz[..., :Di], xz[..., Di:]
    x = _silu(_conv(x, p["conv1d.weight"], p.get("conv1d.bias")))
    dbc = x @ p["x_proj.weight"].T
    dt = _softplus(dbc[..., :R] @ p["dt_proj.weight"].T + p["dt_proj.bias"])
    Bm, Cm = dbc[..., R:R + N], dbc[..., R + N:]
    A = -np.exp(p["A_log"])
    B_, T = u.shape[:2]
    h = np.zeros((B_, Di, N))
    y = np.zeros((B_, T, Di))
    for t in range(T):
        h = np.exp(dt[:, t, :, None] * A) * h + dt[:, t, :, None] * Bm[:, t, None, :] \
            * x[:, t, :, None]
        y[:, t] = np.sum(h * Cm[:, t, None, :], axis=-1) + p["D"] * x[:, t]
    y = y * _silu(z)
    return _lin(y, p, "out_proj")


def ref_mamba2(p, u, headdim, ngroups, eps=1e-5):
    """Mamba-2 mixer on u [B, T, d] with parameters p (HF names), float64."""
    H = p["A_log"].shape[0]
    Di = H * headdim
    GN = (p["conv1d.weight"].shape[0] - Di) // 2
    N = GN // ngroups
    proj = _lin(u, p, "in_proj")
    z, xbc, dt = proj[..., :Di], proj[..., Di:2 * Di + 2 * GN], proj[..., 2 * Di + 2 * GN:]
    xbc = _silu(_conv(xbc, p["conv1d.weight"], p.get("conv1d.bias")))
    B_, T = u.shape[:2]
    x = xbc[..., :Di].reshape(B_, T, H, headdim)
    Bm = xbc[..., Di:Di + GN].reshape(B_, T, ngroups, N)
    Cm = xbc[..., Di + GN:].reshape(B_, T, ngroups, N)
    dt = _softplus(dt + p["dt_bias"])
    A = -np.exp(p["A_log"])
    group = np.arange(H) // (H // ngroups)          # head -> its group of B and C
    h = np.zeros((B_, H, headdim, N))
    y = np.zeros((B_, T, H, headdim))
    for t in range(T):
        decay = np.exp(dt[:, t] * A)[:, :, None, None]
        h = decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * Bm[:, t, group][:, :, None, :]
        y[:, t] = np.einsum("bhpn,bhn->bhp", h, Cm[:, t, group]) + p["D"][:, None] * x[:, t]
    y = y.reshape(B_, T, Di) * _silu(z)
    yg = y.reshape(B_, T, ngroups, Di // ngroups)
    yg = yg / np.sqrt(np.mean(yg ** 2, axis=-1, keepdims=True) + eps)
    y = yg.reshape(B_, T, Di) * p["norm.weight"]
    return _lin(y, p, "out_proj")


def ref_lm(lm, ids):
    """Logits of MambaLM `lm` (float64) on ids by the transcriptions above."""
    sd = {k: np.asarray(v, np.float64) for k, v in lm.state_dict().items()}
    c = lm.config
    eps = c.layer_norm_epsilon

    def norm(v, w):
        return v / np.sqrt(np.mean(v ** 2, axis=-1, keepdims=True) + eps) * w

    h = sd["backbone.embeddings.weight"][ids]
    for i in range(c.num_hidden_layers):
        pre = f"backbone.layers.{i}.mixer."
        p = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
        u = norm(h, sd[f"backbone.layers.{i}.norm.weight"])
        if c.model_type == "mamba":
            h = h + ref_mamba(p, u)
        else:
            h = h + ref_mamba2(p, u, c.head_dim, c.n_groups, eps)
    h = norm(h, sd["backbone.norm_f.weight"])
    head = sd.get("lm_head.weight", sd["backbone.embeddings.weight"])
    return h @ head.T


# ---- helpers ---------------------------------------------------------------------------------

def _err(a, b):
    """max|a - b| / max(1, max|b|)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    if b.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b))) / max(1.0, float(np.max(np.abs(b))))


def _params64(blk):
    return {k: np.asarray(v, np.float64) for k, v in blk.state_dict().items()}


BLOCKS = {
    "mamba": lambda **kw: nn.Mamba(12, d_state=5, d_conv=3, expand=2, **kw),
    "mamba-bias": lambda **kw: nn.Mamba(12, d_state=5, d_conv=4, dt_rank=3, bias=True,
                                        conv_bias=False, **kw),
    "mamba2": lambda **kw: nn.Mamba2(16, d_state=6, d_conv=4, expand=2, headdim=8, ngroups=1,
                                     chunk_size=4, **kw),
    "mamba2-g2": lambda **kw: nn.Mamba2(16, d_state=6, d_conv=3, expand=2, headdim=4,
                                        ngroups=2, chunk_size=4, bias=True, **kw),
}


def _reference(name, blk, u):
    if name.startswith("mamba2"):
        return ref_mamba2(_params64(blk), u, blk.headdim, blk.ngroups, blk.norm_eps)
    return ref_mamba(_params64(blk), u)


def _input(blk, B=2, T=9, seed=1, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal((B, T, blk.d_model)).astype(dtype)


# ---- blocks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BLOCKS)
def test_block_float64_matches_numpy_transcription(name):
    blk = BLOCKS[name](dtype="float64", seed=3)
    u = _input(blk)
    y, cache = blk(u)
    assert y.shape == u.shape and y.dtype == np.float64
    assert _err(y, _reference(name, blk, u)) < 1e-10


@pytest.mark.parametrize("name", BLOCKS)
def test_block_float32_close_to_float64(name):
    blk = BLOCKS[name](dtype="float32", seed=3)
    u = _input(blk, dtype=np.float32)
    y, _ = blk(u)
    assert y.dtype == np.float32
    assert _err(y, _reference(name, blk, u.astype(np.float64))) < 1e-4


@pytest.mark.parametrize("name", BLOCKS)
def test_block_decode_and_chunks_equal_prefill(name):
    blk = BLOCKS[name](dtype="float64", seed=4)
    u = _input(blk, T=11, seed=2)
    y, cache = blk(u)
    # one token at a time
    c, steps = None, []
    for t in range(u.shape[1]):
        yt, c = blk(u[:, t:t + 1], c)
        steps.append(yt)
    assert _err(np.concatenate(steps, axis=1), y) < 1e-10
    assert _err(c.ssm_state, cache.ssm_state) < 1e-10
    assert np.array_equal(c.conv_state, cache.conv_state)
    # two chunks, then a decode step
    y1, c2 = blk(u[:, :6])
    y2, c2b = blk(u[:, 6:], c2)
    assert c2b is c2                                   # the cache is updated in place
    assert _err(np.concatenate([y1, y2], axis=1), y) < 1e-10
    nxt = _input(blk, T=1, seed=9)
    a, _ = blk(nxt, c2.copy())
    b, _ = blk(nxt, cache.copy())
    assert _err(a, b) < 1e-10


@pytest.mark.parametrize("name", ["mamba", "mamba2-g2"])
def test_block_lengths_match_unpadded_rows(name):
    blk = BLOCKS[name](dtype="float64", seed=5)
    u = _input(blk, B=3, T=7, seed=3)
    lengths = np.array([7, 3, 0])
    y, cache = blk(u, lengths=lengths)
    for b, n in enumerate(lengths):
        yb, cb = blk(u[b:b + 1, :n])
        assert _err(y[b:b + 1, :n], yb) < 1e-10
        assert np.all(y[b, n:] == 0)
        assert _err(cache.ssm_state[b:b + 1], cb.ssm_state) < 1e-10
        assert _err(cache.conv_state[b:b + 1], cb.conv_state) < 1e-12


@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_block_state_dict_roundtrip_and_pickle(name):
    blk = BLOCKS[name](dtype="float64", seed=6)
    other = BLOCKS[name](dtype="float64", seed=7)
    u = _input(blk)
    y, _ = blk(u)
    assert not np.allclose(other(u)[0], y)
    other.load_state_dict(blk.state_dict())
    assert np.array_equal(other(u)[0], y)
    sd = blk.state_dict()
    assert sd["conv1d.weight"].shape[1] == 1 and not sd["A_log"].flags.writeable
    clone = pickle.loads(pickle.dumps(blk))
    assert np.array_equal(clone(u)[0], y)
    c = blk(u[:, :4])[1]
    assert pickle.loads(pickle.dumps(c)).ssm_state.tolist() == c.ssm_state.tolist()


def test_block_parameter_names_and_shapes():
    m = nn.Mamba(8, d_state=4, d_conv=3, expand=2)
    assert {k: v.shape for k, v in m.state_dict().items()} == {
        "in_proj.weight": (32, 8), "conv1d.weight": (16, 1, 3), "conv1d.bias": (16,),
        "x_proj.weight": (1 + 8, 16), "dt_proj.weight": (16, 1), "dt_proj.bias": (16,),
        "A_log": (16, 4), "D": (16,), "out_proj.weight": (8, 16)}
    m2 = nn.Mamba2(8, d_state=4, d_conv=3, expand=2, headdim=4, ngroups=2)
    assert {k: v.shape for k, v in m2.state_dict().items()} == {
        "in_proj.weight": (2 * 16 + 2 * 2 * 4 + 4, 8), "conv1d.weight": (32, 1, 3),
        "conv1d.bias": (32,), "dt_bias": (4,), "A_log": (4,), "D": (4,),
        "norm.weight": (16,), "out_proj.weight": (8, 16)}


def test_block_bad_input():
    blk = nn.Mamba(8, d_state=4, dtype="float32")
    with pytest.raises(TypeError, match="x is float64"):
        blk(np.zeros((1, 2, 8)))
    with pytest.raises(ValueError, match="d_model"):
        blk(np.zeros((1, 2, 7), np.float32))
    with pytest.raises(ValueError, match="ssm_state"):
        blk(np.zeros((1, 1, 8), np.float32),
            nn.MambaCache(np.zeros((1, 16, 3), np.float32), np.zeros((1, 16, 5), np.float32)))
    with pytest.raises(ValueError, match="lengths"):
        blk(np.zeros((2, 3, 8), np.float32), lengths=[1, 4])
    with pytest.raises(ValueError, match="'D' is missing"):
        blk.load_state_dict({k: v for k, v in blk.state_dict().items() if k != "D"})
    with pytest.raises(ValueError, match="A_log"):
        blk.load_state_dict({**blk.state_dict(), "A_log": np.zeros((16, 3))})
    with pytest.raises(ValueError, match="ngroups"):
        nn.Mamba2(16, headdim=8, ngroups=3)
    y, c = blk(np.zeros((2, 0, 8), np.float32))
    assert y.shape == (2, 0, 8) and not c.ssm_state.any()


# ---- language model --------------------------------------------------------------------------

LM_CONFIGS = {
    "mamba": dict(model_type="mamba", vocab_size=37, hidden_size=16, num_hidden_layers=2,
                  state_size=4, conv_kernel=3, expand=2),
    "mamba2": dict(model_type="mamba2", vocab_size=37, hidden_size=16, num_hidden_layers=2,
                   state_size=6, conv_kernel=4, expand=2, head_dim=8, n_groups=2,
                   chunk_size=4, tie_word_embeddings=False),
}


@pytest.mark.parametrize("kind", LM_CONFIGS)
def test_lm_matches_transcription_and_decodes(kind):
    lm = nn.MambaLM(LM_CONFIGS[kind], dtype="float64", seed=1)
    ids = np.random.default_rng(0).integers(0, 37, (2, 10))
    logits, cache = lm(ids)
    assert logits.shape == (2, 10, 37)
    assert _err(logits, ref_lm(lm, ids)) < 1e-10
    c, steps = None, []
    for t in range(ids.shape[1]):
        lt, c = lm(ids[:, t:t + 1], c)
        steps.append(lt)
    assert _err(np.concatenate(steps, axis=1), logits) < 1e-10
    # greedy generation is the argmax of the prefill logits of its own output
    out = lm.generate(ids[:, :4], max_new_tokens=6)
    assert out.shape == (2, 10) and np.array_equal(out[:, :4], ids[:, :4])
    full, _ = lm(out)
    assert np.array_equal(out[:, 4:], np.argmax(full[:, 3:-1], axis=-1))


def test_lm_pickles_with_tied_head():
    lm = nn.MambaLM(LM_CONFIGS["mamba"], seed=2)
    clone = pickle.loads(pickle.dumps(lm))
    assert clone.lm_head is clone.embeddings
    ids = np.array([[4, 5, 6]])
    assert np.array_equal(clone(ids)[0], lm(ids)[0])


def test_lm_sampling_is_seeded():
    lm = nn.MambaLM(LM_CONFIGS["mamba"], seed=2)
    ids = np.array([[1, 2, 3]])
    a = lm.generate(ids, max_new_tokens=8, temperature=1.0, seed=5)
    b = lm.generate(ids, max_new_tokens=8, temperature=1.0, seed=5)
    assert np.array_equal(a, b) and a.min() >= 0 and a.max() < 37
    eos = lm.generate(ids, max_new_tokens=8, eos_token_id=int(lm.generate(ids, 1)[0, -1]))
    assert np.all(eos[0, 3:] == eos[0, 3])


def test_lm_bad_input():
    lm = nn.MambaLM(LM_CONFIGS["mamba"], seed=2)
    with pytest.raises(ValueError, match="input_ids"):
        lm(np.array([[1, 37]]))
    with pytest.raises(TypeError, match="input_ids"):
        lm(np.array([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="input_ids"):
        lm(np.array([1, 2]))
    with pytest.raises(TypeError, match="cache"):
        lm(np.array([[1]]), cache=[None])


# ---- checkpoints -----------------------------------------------------------------------------

def _save(lm, path, config, drop=(), change=None):
    st_numpy = pytest.importorskip("safetensors.numpy")
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in lm.state_dict().items()
               if k not in drop}
    tensors.update(change or {})
    st_numpy.save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("kind", LM_CONFIGS)
def test_from_pretrained_roundtrip(tmp_path, kind):
    lm = nn.MambaLM(LM_CONFIGS[kind], seed=3)
    _save(lm, tmp_path, {**LM_CONFIGS[kind], "time_step_rank": "auto", "hidden_act": "silu"})
    loaded = nn.MambaLM.from_pretrained(tmp_path)
    ids = np.array([[3, 1, 4, 1, 5]])
    assert np.array_equal(loaded(ids)[0], lm(ids)[0])
    assert ("lm_head.weight" in loaded.state_dict()) == (kind == "mamba2")
    assert nn.MambaLM.from_pretrained(tmp_path, dtype="float64")(ids)[0].dtype == np.float64


def test_bad_checkpoints(tmp_path):
    cfg = LM_CONFIGS["mamba"]
    lm = nn.MambaLM(cfg, seed=3)
    cases = [
        (dict(drop=["backbone.layers.1.mixer.x_proj.weight"]), ValueError,
         "backbone.layers.1.mixer.x_proj.weight"),
        (dict(change={"backbone.norm_f.weight": np.ones(15, np.float32)}), ValueError,
         "backbone.norm_f.weight"),
        (dict(config={**cfg, "model_type": "mamba3"}), ValueError, "model_type"),
        (dict(config={k: v for k, v in cfg.items() if k != "hidden_size"}), ValueError,
         "hidden_size"),
        (dict(config={**cfg, "state_size": 2.5}), TypeError, "state_size"),
        (dict(config={**cfg, "hidden_act": "gelu"}), ValueError, "hidden_act"),
    ]
    for i, (kw, exc, match) in enumerate(cases):
        d = tmp_path / str(i)
        d.mkdir()
        _save(lm, d, kw.pop("config", cfg), **kw)
        with pytest.raises(exc, match=match):
            nn.MambaLM.from_pretrained(d)
    with pytest.raises(FileNotFoundError, match="config.json"):
        nn.MambaLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        nn.MambaLM.from_pretrained(tmp_path)


def _write_safetensors(path, tensors):
    """The safetensors format by hand (8-byte header length, JSON header, raw data), so
    bfloat16 tensors (uint16 arrays here) can be written without torch."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, arr) in tensors.items():
        raw = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    path.write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def test_from_pretrained_shards_and_bfloat16(tmp_path):
    pytest.importorskip("safetensors")
    cfg = LM_CONFIGS["mamba2"]
    lm = nn.MambaLM(cfg, seed=4)
    sd = {k: np.asarray(v, np.float32) for k, v in lm.state_dict().items()}
    bf16 = {k: (v.view(np.uint32) >> 16).astype(np.uint16) for k, v in sd.items()}
    names = sorted(sd)
    half = len(names) // 2
    _write_safetensors(tmp_path / "a.safetensors", {k: ("BF16", bf16[k]) for k in names[:half]})
    _write_safetensors(tmp_path / "b.safetensors", {k: ("F32", sd[k]) for k in names[half:]})
    index = {"weight_map": {k: ("a" if i < half else "b") + ".safetensors"
                            for i, k in enumerate(names)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = nn.MambaLM.from_pretrained(tmp_path)
    expected = {k: ((bf16[k].astype(np.uint32) << 16).view(np.float32) if i < half else sd[k])
                for i, k in enumerate(names)}
    for k, v in loaded.state_dict().items():
        assert np.array_equal(v, expected[k]), k


@pytest.mark.parametrize("kind", LM_CONFIGS)
def test_lm_padded_batch_equals_rows(kind):
    lm = nn.MambaLM(LM_CONFIGS[kind], dtype="float64", seed=5)
    ids = np.random.default_rng(6).integers(0, 37, (3, 8))
    lengths = np.array([8, 2, 5])
    logits, cache = lm(ids, lengths=lengths)
    out = lm.generate(ids, max_new_tokens=5, lengths=lengths)
    for b, n in enumerate(lengths):
        row, row_cache = lm(ids[b:b + 1, :n])
        assert _err(logits[b:b + 1, :n], row) < 1e-10 and np.all(logits[b, n:] == 0)
        for c, rc in zip(cache, row_cache):
            assert _err(c.ssm_state[b:b + 1], rc.ssm_state) < 1e-10
        expected = lm.generate(ids[b:b + 1, :n], max_new_tokens=5)
        assert np.array_equal(out[b, 8:], expected[0, n:])
        assert np.array_equal(out[b, :8], ids[b])
