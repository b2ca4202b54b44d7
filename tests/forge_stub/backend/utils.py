"""Stand-in for backend/utils.py: attribute access by dotted name."""

import torch


def get_attr(obj, attr):
    for name in attr.split("."):
        obj = getattr(obj, name)
    return obj


def set_attr_raw(obj, attr, value):
    *path, last = attr.split(".")
    for name in path:
        obj = getattr(obj, name)
    setattr(obj, last, value)


def get_attr_with_parent(obj, attr):
    parent, name = obj, None
    for name in attr.split("."):
        parent, obj = obj, getattr(obj, name)
    return parent, name, obj


def tensor2parameter(x):
    return x if isinstance(x, torch.nn.Parameter) else torch.nn.Parameter(x, requires_grad=False)
