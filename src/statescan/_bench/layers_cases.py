"""Benchmark grid of the statescan.nn layers: a 2-layer bidirectional LSTM (H=256, T=512),
B in {1, 16, 64}, with and without lengths, forward and forward+backward.

Peers: PyTorch's nn.LSTM on the padded batch (``torch``; with lengths it computes the padded
steps too and its final states are wrong, so its output is not verified), PyTorch on the
packed batch (``torch-packed``, pack_padded_sequence: the correct result), ONNX Runtime's
bidirectional LSTM operator chained twice (``onnxruntime``, with ``sequence_lens``), and
PyTorch autograd for forward+backward (dx is verified).
"""
import numpy as np

from .. import nn, vjp
from .core import STATESCAN, Case, Runner, add_peer, import_peer, threads
from .peers import _ONNX_GATES

LAYERS, H = 2, 256


def cases(quick):
    grid = ([(1, 64, 64), (8, 64, 64)] if quick
            else [(B, 512, 256) for B in (1, 16, 64)])
    out = []
    for B, T, hidden in grid:
        for lengths in (False, True):
            for backward in (False, True):
                for dtype in ("float32", "float64"):
                    out.append(_case(B, T, hidden, lengths, backward, dtype))
    return out


def _flops(B, T, hidden, backward):
    """Per call: per layer and direction, the input GEMM and the recurrent matmul."""
    G = 4
    per = sum(2.0 * B * T * G * hidden * (inp + hidden) for inp in (hidden, 2 * hidden))
    return 2 * per * (3 if backward else 1)


def _case(B, T, hidden, lengths, backward, dtype):
    name = "lstm-2x-bi" + ("-fwdbwd" if backward else "") + ("-lengths" if lengths else "")
    return Case("layers", name, {"B": B, "T": T, "H": hidden}, dtype, T,
                _flops(B, T, hidden, backward),
                lambda: _make(B, T, hidden, lengths, backward, dtype))


def _inputs(B, T, hidden, lengths, dtype):
    rng = np.random.default_rng(B * 131 + T)
    layer = nn.LSTM(hidden, hidden, LAYERS, bidirectional=True, dtype=dtype, seed=0)
    x = rng.standard_normal((B, T, hidden)).astype(dtype)
    lens = None
    if lengths:          # uniform in [1, T] (mean ~T/2), the longest row at T
        lens = rng.integers(1, T + 1, B)
        lens[0] = T
    dy = rng.standard_normal((B, T, 2 * hidden)).astype(dtype)
    return layer, x, lens, dy


def _make(B, T, hidden, lengths, backward, dtype):
    layer, x, lens, dy = _inputs(B, T, hidden, lengths, dtype)
    if backward:
        def run():
            _, pullback = vjp(layer, x, lengths=lens)
            return pullback((dy, None))[0]
        runners = {STATESCAN: run}
        add_peer(runners, "torch", _torch_backward, layer, x, lens, dy)
        return runners
    runners = {STATESCAN: lambda: layer(x, lengths=lens)[0]}
    add_peer(runners, "torch", _torch_forward, layer, x, None, verify=lens is None)
    if lens is not None:
        add_peer(runners, "torch-packed", _torch_forward, layer, x, lens)
    add_peer(runners, "onnxruntime", _onnxruntime, layer, x, lens)
    return runners


def _torch_module(layer):
    torch = import_peer("torch")
    m = torch.nn.LSTM(layer.input_size, layer.hidden_size, layer.num_layers, batch_first=True,
                      bidirectional=layer.bidirectional)
    m = m.to(torch.float64 if layer.dtype == np.float64 else torch.float32)
    m.load_state_dict({k: torch.from_numpy(v) for k, v in layer.state_dict().items()})
    return torch, m


def _torch_forward(layer, x, lens, verify=True):
    torch, m = _torch_module(layer)
    xt = torch.from_numpy(x)
    T = x.shape[1]
    pack = torch.nn.utils.rnn.pack_padded_sequence
    unpack = torch.nn.utils.rnn.pad_packed_sequence
    lt = None if lens is None else torch.from_numpy(lens)

    def run():
        with torch.no_grad():
            if lt is None:
                y = m(xt)[0]
            else:
                y = unpack(m(pack(xt, lt, batch_first=True, enforce_sorted=False))[0],
                           batch_first=True, total_length=T)[0]
        return y if verify else None
    return run


def _torch_backward(layer, x, lens, dy):
    torch, m = _torch_module(layer)
    xt, dyt = torch.from_numpy(x.copy()).requires_grad_(), torch.from_numpy(dy)
    T = x.shape[1]
    pack = torch.nn.utils.rnn.pack_padded_sequence
    unpack = torch.nn.utils.rnn.pad_packed_sequence
    lt = None if lens is None else torch.from_numpy(lens)

    def run():
        xt.grad = None
        m.zero_grad(set_to_none=True)
        if lt is None:
            y = m(xt)[0]
        else:
            y = unpack(m(pack(xt, lt, batch_first=True, enforce_sorted=False))[0],
                       batch_first=True, total_length=T)[0]
        y.backward(dyt)
        return xt.grad
    return run


def _onnxruntime(layer, x, lens):
    """Two bidirectional ONNX LSTM nodes; between them [T, 2, B, H] -> [T, B, 2H]."""
    if x.dtype != np.float32:
        from .core import Skipped
        return Skipped("ONNX Runtime's LSTM kernel is float32 only")
    ort = import_peer("onnxruntime")
    import_peer("onnx")
    from onnx import TensorProto, checker, helper, numpy_helper
    hidden, sd = layer.hidden_size, layer.state_dict()
    order = _ONNX_GATES["lstm"]

    def reorder(a):
        return np.concatenate([a[g * hidden:(g + 1) * hidden] for g in order])

    nodes, inits = [], []
    inp = "X"
    for l in range(layer.num_layers):
        names = [f"_l{l}", f"_l{l}_reverse"]
        W = np.stack([reorder(sd["weight_ih" + s]) for s in names])
        R = np.stack([reorder(sd["weight_hh" + s]) for s in names])
        Bias = np.stack([np.concatenate([reorder(sd["bias_ih" + s]), reorder(sd["bias_hh" + s])])
                         for s in names])
        for n, v in ((f"W{l}", W), (f"R{l}", R), (f"B{l}", Bias)):
            inits.append(numpy_helper.from_array(v, n))
        nodes.append(helper.make_node("LSTM", [inp, f"W{l}", f"R{l}", f"B{l}",
                                               "lens" if lens is not None else ""],
                                      [f"Y{l}"], hidden_size=hidden, direction="bidirectional"))
        nodes.append(helper.make_node("Transpose", [f"Y{l}"], [f"Yt{l}"], perm=[0, 2, 1, 3]))
        nodes.append(helper.make_node("Reshape", [f"Yt{l}", "shape3"], [f"Z{l}"]))
        inp = f"Z{l}"
    inits.append(numpy_helper.from_array(np.array([0, 0, -1], np.int64), "shape3"))
    B, T, I = x.shape
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [T, B, I])]
    if lens is not None:
        inputs.append(helper.make_tensor_value_info("lens", TensorProto.INT32, [B]))
    graph = helper.make_graph(nodes, "lstm_stack", inputs,
                              [helper.make_tensor_value_info(inp, TensorProto.FLOAT,
                                                             [T, B, 2 * hidden])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    feed = {"X": np.ascontiguousarray(x.transpose(1, 0, 2))}     # ONNX is sequence-first
    if lens is not None:
        feed["lens"] = lens.astype(np.int32)

    def run():
        return session.run([inp], feed)[0].transpose(1, 0, 2)
    return run
