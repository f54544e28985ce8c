"""``from_torch``: a statescan layer from a ``torch.nn.LSTM`` / ``GRU`` / ``RNN`` module.

torch is imported here only, when a user converts a module.
"""
import numpy as np


def from_torch(cls, module):
    import torch

    if cls._torch_name is None:
        raise NotImplementedError(f"{cls.__name__} has no PyTorch counterpart to import from")
    expected = getattr(torch.nn, cls._torch_name)
    if not isinstance(module, expected):
        raise TypeError(f"{cls.__name__}.from_torch needs a torch.nn.{cls._torch_name}, "
                        f"got {type(module).__name__}")
    if getattr(module, "proj_size", 0):
        raise NotImplementedError(f"proj_size={module.proj_size} is not supported "
                                  "(LSTM with projections)")
    nonlinearity = getattr(module, "nonlinearity", "tanh")
    if nonlinearity != "tanh":
        raise NotImplementedError(f"nonlinearity={nonlinearity!r} is not supported "
                                  "(statescan's Elman cell is tanh)")
    params = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    dtypes = {v.dtype for v in params.values()}
    if not dtypes <= {torch.float32, torch.float64} or len(dtypes) != 1:
        raise NotImplementedError(f"weights of dtype {', '.join(sorted(map(str, dtypes)))} are "
                                  "not supported (float32 or float64; convert the module with "
                                  ".float() or .double())")
    dtype = np.float64 if dtypes == {torch.float64} else np.float32
    layer = cls(module.input_size, module.hidden_size, module.num_layers, bias=module.bias,
                bidirectional=module.bidirectional, dtype=dtype)
    layer.load_state_dict({k: v.numpy() for k, v in params.items()})
    return layer
