"""Stand-in for backend/operations_bnb.py: NF4/FP4 weights are packed bytes with ``bnb_quantized`` set."""

import torch


class ForgeParams4bit(torch.nn.Parameter):
    """Packed 4-bit weights (here: the fp16 bytes, uint8); Forge's LoRA loader tests ``bnb_quantized``."""

    def __new__(cls, data=None, requires_grad=False, quant_type="nf4"):
        self = torch.Tensor._make_subclass(cls, data, requires_grad)
        self.bnb_quantized = True
        self.quant_type = quant_type
        return self


def pack(weight, quant_type):
    return ForgeParams4bit(weight.to(torch.float16).contiguous().view(torch.uint8), quant_type=quant_type)
