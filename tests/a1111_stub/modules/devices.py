"""Stand-in for modules/devices.py: the CPU is the only device here."""

import contextlib

import torch

cpu = torch.device("cpu")
device = cpu
dtype = torch.float16
dtype_vae = torch.float16
dtype_unet = torch.float16
fp8 = False


def autocast(disable=False):
    """A1111 returns ``torch.autocast`` on CUDA; on the CPU in fp32 a null context."""
    return contextlib.nullcontext()


def torch_gc():
    """A1111 empties the CUDA cache here."""
