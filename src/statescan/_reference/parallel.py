"""numpy reference for the linear-recurrence scans (the interface of ``statescan._ext.parallel``).

  block_scan: h[:, t, k] = A[:, t, k] @ h[:, t-1, k] + b[:, t, k]
              M [B,T,K,m,m] holds A, or A transposed (M[..., j, i] = A[..., i, j]) when
              `transposed`; b, h [B,T,K,m]; h0 [B,K,m]
  diag_scan:  h[:, t] = a[:, t] * h[:, t-1] + b[:, t];  a, b, h [B,T,n]; h0 [B,n]
"""
import numpy as np

from .scan import linear_scan_forward as diag_scan  # noqa: F401  (the same recurrence)


def block_scan(M, transposed, b, h0):
    At = M if transposed else np.swapaxes(M, -1, -2)
    h = np.empty_like(b)
    prev = h0
    for t in range(b.shape[1]):
        prev = np.matmul(prev[..., None, :], At[:, t])[..., 0, :] + b[:, t]
        h[:, t] = prev
    return h
