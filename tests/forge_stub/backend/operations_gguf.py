"""Stand-in for backend/operations_gguf.py: GGUF weights are packed bytes with a ``gguf_cls``."""

import torch


class Q8_0:
    """A quantization class as ``gguf_cls`` names one (Forge: ``quantize_pytorch``, ``dequantize``)."""


class ParameterGGUF(torch.nn.Parameter):
    def __new__(cls, data=None, requires_grad=False):
        self = torch.Tensor._make_subclass(cls, data, requires_grad)
        self.gguf_cls = Q8_0
        return self


def pack(weight):
    return ParameterGGUF(weight.to(torch.float16).contiguous().view(torch.uint8))
