"""numpy reference for the block scan (the interface of ``statescan._ext.parallel``).

  block_scan: h[:, t, k] = A[:, t, k] @ h[:, t-1, k] + b[:, t, k]
              M [B,T,K,m,m] holds A, or A transposed (M[..., j, i] = A[..., i, j]) when
              `transposed`; b, h [B,T,K,m]; h0 [B,K,m]
The diagonal scan is ``_reference.scan.linear_scan`` (one kernel serves both).
"""
import numpy as np


def block_scan(M, transposed, b, h0):
    At = M if transposed else np.swapaxes(M, -1, -2)
    h = np.empty_like(b)
    prev = h0
    for t in range(b.shape[1]):
        prev = np.matmul(prev[..., None, :], At[:, t])[..., 0, :] + b[:, t]
        h[:, t] = prev
    return h
