"""PyTorch's meta device as a stand-in GPU: tensors there have shapes but no data, so what a
call sends between host and accelerator can be counted without one."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_F = torch.ops.aten


class StandInDevice(TorchDispatchMode):
    """Counts host reads of meta tensors (`.item()`, `bool(t)`, `.tolist()`, `torch.equal`, a copy
    back to the CPU; answered with a dummy value: 1, True, ones) and copies from the CPU onto the meta device
    (on a GPU, a copy the host waits for unless its memory is pinned)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _F._local_scalar_dense.default and args[0].device.type == "meta":
            self.reads += 1
            return {torch.bool: True}.get(args[0].dtype, 1)
        if func is _F.equal.default and args[0].device.type == "meta":
            self.reads += 1  # torch.equal answers a Python bool: the device waits for the comparison
            return True
        if func is _F._to_copy.default and args[0].device.type == "meta" and str(kwargs.get("device")) == "cpu":
            self.reads += 1  # a copy back to the host: ones (finite, True) stand in for the data
            return torch.ones(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        out = func(*args, **kwargs)
        if func is _F._to_copy.default:
            src, dst = args[0], out
        elif func is _F.copy_.default:
            dst, src = args[0], args[1]
        else:
            return out
        self.copies += src.device.type == "cpu" and dst.device.type == "meta"
        return out
