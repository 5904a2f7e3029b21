"""One InferenceSession per call signature (graph kind, its signature, the providers), built on first use
and kept; calls bind torch tensors' memory directly (IOBinding), inputs and outputs alike, so nothing is
copied between torch and ORT."""
from __future__ import annotations

import threading

import numpy as np
import onnxruntime as ort
import torch

from . import graphs, kernels

_ELEMENT = {torch.float32: np.float32, torch.int64: np.int64, torch.int32: np.int32, torch.bool: np.bool_}
_SESSIONS: dict = {}
_LOCK = threading.Lock()


def clear() -> None:
    _SESSIONS.clear()


def session(kind: str, sig: dict) -> ort.InferenceSession:
    """The cached session of graph builder `kind` (graphs.py) for signature `sig`."""
    key = (kind, tuple(sorted(sig.items())), kernels.providers())
    found = _SESSIONS.get(key)
    if found is None:
        with _LOCK:
            found = _SESSIONS.get(key)
            if found is None:
                model = getattr(graphs, kind)(sig).SerializeToString()
                opts = ort.SessionOptions()
                opts.log_severity_level = 3  # ORT warns about symbolic output shapes it resolves at run time
                found = _SESSIONS[key] = ort.InferenceSession(model, opts, providers=list(key[2]))
    return found


def run(kind: str, sig: dict, inputs: dict, outputs: dict) -> None:
    """Run the graph, reading `inputs` and writing `outputs` (torch tensors by graph name, CPU; outputs
    contiguous and of the graph's shapes) in place."""
    sess = session(kind, sig)
    io = sess.io_binding()
    held = []  # contiguous copies must outlive the run
    for name, x in inputs.items():
        x = x.contiguous()
        held.append(x)
        if x.numel():
            io.bind_input(name, "cpu", 0, _ELEMENT[x.dtype], tuple(x.shape), x.data_ptr())
        else:  # an empty tensor has no buffer to bind (a width-1 conv's state [S, C, 0])
            io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_shape_and_type(list(x.shape), _ELEMENT[x.dtype]))
    for name, y in outputs.items():
        if y.numel():
            io.bind_output(name, "cpu", 0, _ELEMENT[y.dtype], tuple(y.shape), y.data_ptr())
        else:
            io.bind_output(name, "cpu")
    sess.run_with_iobinding(io)
