"""A Mamba / Mamba-2 language model loaded from a Hugging Face checkpoint directory.

``backbone.embeddings`` -> layers ``h = h + mixer(RMSNorm(h))`` -> ``backbone.norm_f`` ->
``lm_head`` (tied to the embedding unless the checkpoint has its own), exactly Hugging
Face's ``MambaForCausalLM`` / ``Mamba2ForCausalLM``; numpy and statescan's kernels only.
"""
import numpy as np

from .. import _validate
from ._checkpoint import MambaConfig, parse_config, read_config, read_tensors, take
from ._norm import rms_norm
from .mamba import NO_INIT, Mamba, Mamba2

_PREFIX = "backbone."


class MambaLM:
    """Mamba (``model_type="mamba"``) or Mamba-2 (``"mamba2"``) causal language model.

    Parameters
    ----------
    config : dict or MambaConfig
        The contents of a Hugging Face config.json (transformers' ``MambaConfig`` /
        ``Mamba2Config`` field names: hidden_size, num_hidden_layers, state_size, ...).
    state_dict : dict, optional
        Weights with Hugging Face names (``backbone.embeddings.weight``,
        ``backbone.layers.{i}.mixer.in_proj.weight``, ..., ``lm_head.weight``); random
        weights (seeded by `seed`) when None.
    dtype : "float32" or "float64"
    seed : int, optional

    Use :meth:`from_pretrained` for a checkpoint directory.

    Notes
    -----
    ``logits, cache = lm(input_ids, cache=None, lengths=None)``: input_ids int [B, T] ->
    logits [B, T, vocab_size]; ``cache`` is a list with one :class:`~statescan.nn.MambaCache`
    per layer; pass it back to continue the sequences (it is updated in place).  ``lengths``
    [B] marks a right-padded batch.
    """

    def __init__(self, config, state_dict=None, *, dtype="float32", seed=None):
        if not isinstance(config, MambaConfig):
            config = parse_config(config)
        self.config = config
        self.dtype = np.dtype(_validate.choice("dtype", str(np.dtype(dtype)),
                                               ("float32", "float64")))
        c = config
        if state_dict is not None:           # no random weights only to overwrite them
            self.layers = [self._mixer(NO_INIT) for _ in range(c.num_hidden_layers)]
            self.load_state_dict(state_dict)
            return
        seeds = np.random.SeedSequence(seed).spawn(c.num_hidden_layers + 1)
        self.layers = [self._mixer(np.random.default_rng(s)) for s in seeds[1:]]
        rng = np.random.default_rng(seeds[0])
        self.embeddings = rng.standard_normal((c.vocab_size, c.hidden_size)).astype(self.dtype)
        self.norms = [np.ones(c.hidden_size, self.dtype) for _ in self.layers]
        self.norm_f = np.ones(c.hidden_size, self.dtype)
        self.lm_head = self.embeddings if c.tie_word_embeddings else (
            rng.uniform(-1, 1, (c.vocab_size, c.hidden_size)) / np.sqrt(c.hidden_size)
        ).astype(self.dtype)

    def _mixer(self, rng):
        c = self.config
        seed = rng if rng is NO_INIT else int(rng.integers(2**63))
        if c.model_type == "mamba":
            return Mamba(c.hidden_size, d_state=c.state_size, d_conv=c.conv_kernel,
                         expand=c.expand, dt_rank=c.time_step_rank, bias=c.use_bias,
                         conv_bias=c.use_conv_bias, dtype=self.dtype, seed=seed)
        # config.chunk_size is mamba_ssm's GPU block size; on a CPU the kernel picks its own
        return Mamba2(c.hidden_size, d_state=c.state_size, d_conv=c.conv_kernel,
                      expand=c.expand, headdim=c.head_dim, ngroups=c.n_groups,
                      chunk_size=None, bias=c.use_bias, conv_bias=c.use_conv_bias,
                      norm_eps=c.layer_norm_epsilon, time_step_limit=c.time_step_limit,
                      dtype=self.dtype, seed=seed)

    @classmethod
    def from_pretrained(cls, path, *, dtype="float32"):
        """Load a local Hugging Face checkpoint directory (config.json + model.safetensors,
        or sharded safetensors with an index).  Needs the ``safetensors`` package
        (``pip install 'statescan[models]'``), not torch.  A missing tensor, a tensor of the
        wrong shape or an unsupported config field raises an error naming it."""
        return cls(read_config(path), read_tensors(path), dtype=dtype)

    def __repr__(self):
        c = self.config
        return (f"MambaLM(model_type='{c.model_type}', layers={c.num_hidden_layers}, "
                f"hidden_size={c.hidden_size}, vocab_size={c.vocab_size}, dtype='{self.dtype}')")

    # ---- parameters ----------------------------------------------------------------------

    def state_dict(self):
        """{name: ndarray} with the Hugging Face names (lm_head.weight only when untied)."""
        sd = {_PREFIX + "embeddings.weight": self.embeddings}
        for i, (norm, mixer) in enumerate(zip(self.norms, self.layers)):
            sd[f"{_PREFIX}layers.{i}.norm.weight"] = norm
            for name, arr in mixer.state_dict().items():
                sd[f"{_PREFIX}layers.{i}.mixer.{name}"] = arr
        sd[_PREFIX + "norm_f.weight"] = self.norm_f
        if not self.config.tie_word_embeddings:
            sd["lm_head.weight"] = self.lm_head
        return sd

    def load_state_dict(self, tensors):
        """Load weights with Hugging Face names; extra entries are ignored.  A tied
        checkpoint (no lm_head.weight, or tie_word_embeddings) uses the embedding."""
        c, dt = self.config, self.dtype
        V, d = c.vocab_size, c.hidden_size
        tensors = dict(tensors)
        if _PREFIX + "embedding.weight" in tensors:          # older Mamba-2 spelling
            tensors.setdefault(_PREFIX + "embeddings.weight",
                               tensors[_PREFIX + "embedding.weight"])
        embeddings = take(tensors, _PREFIX + "embeddings.weight", (V, d), dt)
        norms, mixers = [], []
        for i, layer in enumerate(self.layers):
            norms.append(take(tensors, f"{_PREFIX}layers.{i}.norm.weight", (d,), dt))
            prefix = f"{_PREFIX}layers.{i}.mixer."
            mixers.append({name: take(tensors, prefix + name, shape, dt)
                           for name, shape in layer._shapes.items()})
        norm_f = take(tensors, _PREFIX + "norm_f.weight", (d,), dt)
        if c.tie_word_embeddings or "lm_head.weight" not in tensors:
            lm_head = embeddings
        else:
            lm_head = take(tensors, "lm_head.weight", (V, d), dt)
        for layer, values in zip(self.layers, mixers):
            layer._load(values)
        self.embeddings, self.norms, self.norm_f, self.lm_head = embeddings, norms, norm_f, lm_head

    # ---- forward -------------------------------------------------------------------------

    def empty_cache(self, batch_size):
        """Zero caches (one per layer) for `batch_size` sequences."""
        return [layer.empty_cache(batch_size) for layer in self.layers]

    def _ids(self, input_ids):
        ids = np.asarray(input_ids)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"input_ids must be integers, got dtype {ids.dtype}")
        if ids.ndim != 2:
            raise ValueError(f"input_ids must have shape [B, T], got {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"input_ids must lie in [0, vocab_size) = [0, "
                             f"{self.config.vocab_size}), got values in [{ids.min()}, "
                             f"{ids.max()}]")
        return ids

    def _cache(self, cache, B):
        if cache is None:
            return self.empty_cache(B)
        if not isinstance(cache, list) or len(cache) != len(self.layers):
            raise TypeError(f"cache must be the list of {len(self.layers)} layer caches "
                            "returned by a previous call")
        return [layer._check_cache(c, B) for layer, c in zip(self.layers, cache)]

    def _hidden(self, ids, cache, lengths=None):
        """Final normalised hidden states [B, T, d] of ids, continuing and updating cache
        (positions past `lengths` hold garbage; the caches skip them)."""
        h = self.embeddings[ids]
        eps = self.config.layer_norm_epsilon
        step = ids.shape[1] == 1 and lengths is None
        for norm, layer, c in zip(self.norms, self.layers, cache):
            u = rms_norm(h, norm, eps)
            h += layer._step(u, c) if step else layer._prefill(u, c, lengths)
        return rms_norm(h, self.norm_f, eps)

    def _logits(self, h):
        lead = h.shape[:-1]
        return (h.reshape(-1, h.shape[-1]) @ self.lm_head.T).reshape(lead + (-1,))

    def __call__(self, input_ids, cache=None, lengths=None):
        """(logits [B, T, vocab_size], cache) for input_ids [B, T]; see the class docstring.

        ``lengths`` [B]: a right-padded batch; row b's tokens past lengths[b] are padding
        (their logits are 0, the caches skip them, so each row's cache is the state after
        its own last token)."""
        ids = self._ids(input_ids)
        B, T = ids.shape
        lengths = _validate.lengths(lengths, B, T)
        cache = self._cache(cache, B)
        if T == 0 or B == 0:
            return np.zeros((B, T, self.config.vocab_size), self.dtype), cache
        logits = self._logits(self._hidden(ids, cache, lengths))
        if lengths is not None:
            logits[np.arange(T)[None, :] >= lengths[:, None]] = 0
        return logits, cache

    def generate(self, input_ids, max_new_tokens=32, temperature=0.0, seed=None,
                 eos_token_id=None, lengths=None):
        """Continue input_ids [B, T] by `max_new_tokens` tokens.

        Greedy (argmax) when ``temperature == 0``, else sampling from
        softmax(logits / temperature) with a generator seeded by `seed`.  With
        `eos_token_id`, a row that produced it keeps producing it (as Hugging Face pads
        finished rows).  ``lengths`` [B] (each >= 1): prompts of different lengths,
        right-padded to T; row b continues after its own lengths[b] tokens.
        Returns int64 [B, T + max_new_tokens]: the prompts as given (padding included),
        then the new tokens.  The prompts run as one prefill, then one decoding step per
        token for the whole batch.
        """
        ids = self._ids(input_ids).astype(np.int64)
        n = int(max_new_tokens)
        if n < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        temperature = float(temperature)
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        B, T = ids.shape
        lengths = _validate.lengths(lengths, B, T)
        if T == 0 or (lengths is not None and B and lengths.min() == 0):
            raise ValueError("input_ids must hold at least one token per row")
        rng = np.random.default_rng(seed)
        cache = self.empty_cache(B)
        out = np.empty((B, T + n), np.int64)
        out[:, :T] = ids
        done = np.zeros(B, bool)
        last, last_pos = ids, (np.full(B, T - 1) if lengths is None else lengths - 1)
        for i in range(n):
            h = self._hidden(last, cache, lengths if i == 0 else None)
            h = h[np.arange(B), last_pos if i == 0 else -1]
            logits = h @ self.lm_head.T                               # [B, V]
            token = self._pick(logits, temperature, rng)
            if eos_token_id is not None:
                token[done] = eos_token_id
                done |= token == eos_token_id
            out[:, T + i] = token
            last = token[:, None]
        return out

    @staticmethod
    def _pick(logits, temperature, rng):
        if temperature == 0:
            return np.argmax(logits, axis=-1)
        z = logits.astype(np.float64) / temperature
        z -= z.max(axis=-1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=-1, keepdims=True)
        u = rng.random((p.shape[0], 1))
        return np.minimum((np.cumsum(p, axis=-1) < u).sum(axis=-1), p.shape[-1] - 1)
