"""Generate text with a Mamba / Mamba-2 checkpoint on the CPU, without torch.

    python examples/generate_mamba.py CHECKPOINT_DIR [--prompt "Mamba is"] [--tokens 64]

CHECKPOINT_DIR is a local Hugging Face checkpoint directory (config.json and
model.safetensors, e.g. a download of state-spaces/mamba-130m-hf, or a model saved with
transformers' save_pretrained).  The prompt is tokenized with the directory's tokenizer when
it has one and transformers is installed; otherwise the script works on token ids (the prompt
is read as space-separated integers, or a few fixed ids are used).  It runs the prompt as one
prefill call, then one decoding call per new token with the returned cache (what
``MambaLM.generate`` does), and prints the text (or ids) and both speeds in tokens per second.
"""
import argparse
import os
import time

import numpy as np

import statescan as ss
from statescan import nn


def load_tokenizer(path):
    """The checkpoint's tokenizer, or None (no tokenizer files, or no transformers)."""
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    if not any(os.path.exists(os.path.join(path, n)) for n in names):
        return None
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return None
    return AutoTokenizer.from_pretrained(path)


def pick(logits, temperature, rng):
    """Greedy (temperature 0) or sampled next token from one row of logits."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    return int(rng.choice(len(p), p=p / p.sum()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="Hugging Face checkpoint directory")
    parser.add_argument("--prompt", default="The state of a recurrent model",
                        help="text (with a tokenizer) or space-separated token ids")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--threads", type=int, default=None, help="kernel and BLAS threads")
    args = parser.parse_args()

    if args.threads is not None:
        ss.set_num_threads(args.threads)
        try:                                    # numpy's BLAS runs the projections
            from threadpoolctl import threadpool_limits
            threadpool_limits(args.threads)
        except ImportError:
            pass

    t0 = time.perf_counter()
    lm = nn.MambaLM.from_pretrained(args.checkpoint, dtype=args.dtype)
    print(f"loaded {lm} in {time.perf_counter() - t0:.1f} s")
    tokenizer = load_tokenizer(args.checkpoint)
    if tokenizer is not None:
        ids = np.array([tokenizer(args.prompt)["input_ids"]])
    else:
        try:
            ids = np.array([[int(t) for t in args.prompt.split()]])
        except ValueError:
            ids = np.array([[1, 2, 3, 4]]) % lm.config.vocab_size
        print("no tokenizer: working on token ids", ids[0].tolist())

    # prefill: the whole prompt in one call, which returns the per-layer caches
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    logits, cache = lm(ids)
    prefill = time.perf_counter() - t0
    # decode: one token per call, the caches updated in place
    new = []
    t0 = time.perf_counter()
    for i in range(args.tokens):
        token = pick(logits[0, -1], args.temperature, rng)
        new.append(token)
        if i + 1 < args.tokens:
            logits, cache = lm(np.array([[token]]), cache)
    decode = max(time.perf_counter() - t0, 1e-9)
    out = np.concatenate([ids[0], new])[None]

    if tokenizer is not None:
        print(tokenizer.decode(out[0]))
    else:
        print("generated ids:", new)
    print(f"prefill: {ids.shape[1]} tokens in {prefill * 1e3:.1f} ms "
          f"({ids.shape[1] / prefill:.1f} tokens/s)")
    print(f"decode:  {len(new)} tokens in {decode * 1e3:.1f} ms "
          f"({len(new) / decode:.1f} tokens/s)")


if __name__ == "__main__":
    main()
