"""statescan.nn.MambaLM against Hugging Face transformers' MambaForCausalLM /
Mamba2ForCausalLM on CPU: tiny random models built here and saved with save_pretrained (no
download), loaded with MambaLM.from_pretrained; prefill logits and greedy generation."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from statescan import nn  # noqa: E402

pytestmark = pytest.mark.transformers

VOCAB = 61
CONFIGS = {
    "mamba": ("MambaConfig", "MambaForCausalLM",
              dict(hidden_size=24, num_hidden_layers=2, state_size=6, conv_kernel=4, expand=2)),
    "mamba-untied-bias": ("MambaConfig", "MambaForCausalLM",
                          dict(hidden_size=24, num_hidden_layers=2, state_size=4, conv_kernel=3,
                               expand=2, time_step_rank=5, use_bias=True, use_conv_bias=False,
                               tie_word_embeddings=False)),
    "mamba2-g1": ("Mamba2Config", "Mamba2ForCausalLM",
                  dict(hidden_size=32, num_hidden_layers=2, state_size=8, conv_kernel=4,
                       expand=2, head_dim=16, num_heads=4, n_groups=1, chunk_size=8)),
    "mamba2-g2": ("Mamba2Config", "Mamba2ForCausalLM",
                  dict(hidden_size=32, num_hidden_layers=2, state_size=8, conv_kernel=4,
                       expand=2, head_dim=8, num_heads=8, n_groups=2, chunk_size=8,
                       tie_word_embeddings=True)),
}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models: torch's thread pool only adds contention (seconds per generate call)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _hf_model(kind, dtype, path):
    config_cls, model_cls, kw = CONFIGS[kind]
    torch.manual_seed(sum(map(ord, kind)))
    # no eos token: generate runs the full length without suppressing any token's logit
    config = getattr(transformers, config_cls)(vocab_size=VOCAB, pad_token_id=None,
                                               bos_token_id=None, eos_token_id=None, **kw)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():          # a livelier model than the near-identity initialisation
        for name, p in model.named_parameters():
            if name.endswith(("D", "norm.weight", "norm_f.weight")):
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(path)
    return model.to(torch.float64) if dtype == "float64" else model


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.double().numpy()


@pytest.fixture(scope="module", params=[(k, d) for k in CONFIGS for d in ("float32", "float64")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def pair(request, tmp_path_factory):
    kind, dtype = request.param
    path = tmp_path_factory.mktemp(kind)
    model = _hf_model(kind, dtype, path)
    return model, nn.MambaLM.from_pretrained(path, dtype=dtype), dtype


def test_prefill_logits_match_transformers(pair):
    model, lm, dtype = pair
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 19))
    ref = _hf_logits(model, ids)
    ours, _ = lm(ids)
    assert ours.dtype == np.dtype(dtype)
    # transformers keeps parts of a float64 model in float32 (dt, norms, logits)
    tol = 1e-4 if dtype == "float32" else 1e-5
    assert np.max(np.abs(ours - ref)) <= tol * np.max(np.abs(ref))


def test_greedy_generate_matches_transformers(pair):
    model, lm, dtype = pair
    prompt = np.random.default_rng(1).integers(1, VOCAB, (1, 5))
    n = 32
    with torch.no_grad():
        ref = model.generate(torch.from_numpy(prompt), max_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones_like(torch.from_numpy(prompt))).numpy()
    ours = lm.generate(prompt, max_new_tokens=n)
    assert ours.shape == ref.shape == (1, 5 + n)
    diff = np.flatnonzero(ours[0] != ref[0])
    if diff.size:    # acceptable only at a near-tie of transformers' own top-2 logits there
        i = diff[0]
        top2 = np.sort(_hf_logits(model, ref[:, :i])[0, -1])[-2:]
        assert top2[1] - top2[0] < 1e-4, f"tokens differ at {i} without a near-tie"


def test_decode_logits_match_transformers_prefill(pair):
    model, lm, dtype = pair
    ids = np.random.default_rng(2).integers(0, VOCAB, (2, 7))
    ref = _hf_logits(model, ids)
    cache, steps = None, []
    for t in range(ids.shape[1]):
        logits, cache = lm(ids[:, t:t + 1], cache)
        steps.append(logits)
    tol = 1e-4 if dtype == "float32" else 1e-5
    assert np.max(np.abs(np.concatenate(steps, axis=1) - ref)) <= tol * np.max(np.abs(ref))


def test_mamba2_time_step_limit_matches_transformers_prefill(tmp_path):
    # transformers clamps dt only in its chunked (prefill) path, so only prefill compares
    torch.manual_seed(3)
    config = transformers.Mamba2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                       state_size=8, head_dim=16, num_heads=4, n_groups=1,
                                       chunk_size=8, time_step_limit=(0.0, 0.02))
    model = transformers.Mamba2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("dt_bias"):
                p.add_(2.0)                 # softplus(dt) well above the limit: clamped
    model.save_pretrained(tmp_path)
    lm = nn.MambaLM.from_pretrained(tmp_path)
    assert lm.config.time_step_limit == (0.0, 0.02)
    ids = np.random.default_rng(4).integers(0, VOCAB, (2, 19))
    ref = _hf_logits(model, ids)
    assert np.max(np.abs(lm(ids)[0] - ref)) <= 1e-4 * np.max(np.abs(ref))
