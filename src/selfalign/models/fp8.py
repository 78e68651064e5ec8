"""An fp8 view of a backbone for forwards without gradients: the SRA teacher's cheapest precision.

:func:`float8_view` returns a module that shares every parameter and buffer with the given model
(the EMA updates them in place, so there is nothing to keep in sync and nothing new in a
checkpoint) and runs the transformer blocks' attention and MLP linear layers as scaled fp8
(e4m3) matmuls, ``torch._scaled_mm``. Scales are ``amax / 448`` per output channel for the weight
and per token for the activation, computed on every call: the EMA weights move every step, and
under ``torch.compile`` the quantisation fuses into the neighbouring kernels. Everything else
stays as it was (under the caller's autocast): attention itself, norms, embeddings, and the adaLN
modulation, whose matmul has one row per image, so it is bound by reading the weight, which fp8
would not make cheaper.

Hardware fp8 matmuls need CUDA compute capability 8.9 or newer (Ada, Hopper, Blackwell).
PyTorch also runs ``_scaled_mm`` on the CPU, which the tests use to check the numerics.
"""
from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0                   # largest finite e4m3fn value
MIN_CAPABILITY = (8, 9)


def fp8_unavailable_reason(device: torch.device | str) -> str | None:
    """Why fp8 matmuls cannot run on ``device``, or None when they can."""
    device = torch.device(device)
    if not hasattr(torch, "_scaled_mm"):
        return f"this PyTorch ({torch.__version__}) has no torch._scaled_mm"
    if device.type == "cuda" and torch.version.hip:
        return "ROCm GPUs use the e4m3fnuz format, which this view does not implement"
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            return (f"{torch.cuda.get_device_name(device)} has compute capability "
                    f"{capability[0]}.{capability[1]}; fp8 matmuls need 8.9 or newer (Ada, Hopper)")
        return None
    if device.type == "cpu":
        return None
    return f"fp8 matmuls are not supported on {device.type}"


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` with ``x ~= q * scale``: e4m3 values and a float32 scale per row, ``(M, 1)``."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def fp8_eligible(linear: nn.Linear) -> bool:
    """``_scaled_mm`` on CUDA needs both weight dimensions to be multiples of 16."""
    return linear.in_features % 16 == 0 and linear.out_features % 16 == 0


class Float8Linear(nn.Module):
    """``y = x W^T + b`` as a row-scaled fp8 matmul; shares ``weight``/``bias`` with the source layer.

    Inference only (no gradient reaches the weights). The output has the autocast dtype when
    autocast is on, else the input's dtype, as ``nn.Linear`` would give.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if not fp8_eligible(linear):
            raise ValueError(f"fp8 needs in/out features divisible by 16, got {linear.in_features} -> "
                             f"{linear.out_features}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        rows = x.reshape(-1, self.in_features)
        x_q, x_scale = quantize_rows(rows)
        w_q, w_scale = quantize_rows(self.weight.detach())
        # Row-wise scaled matmuls produce bf16 on Hopper; the bias and the cast fuse under compile.
        out = torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale.t(), out_dtype=torch.bfloat16)
        out = out.to(out_dtype)
        if self.bias is not None:
            out = out + self.bias.to(out_dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3 row-scaled"


def float8_view(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s structure over the *same* tensors, with fp8 block linears.

    Every ``nn.Linear`` inside ``model.blocks`` becomes a :class:`Float8Linear`, except the
    adaLN modulation (see the module docstring) and layers whose sizes ``_scaled_mm`` cannot take.
    """
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    view = copy.deepcopy(model, shared)     # the memo makes deepcopy reuse every tensor
    # model.compile() stores a compiled bound method of the *source*: the view must not call it
    view._compiled_call_impl = None
    for block in view.blocks:
        for name, module in list(block.named_modules()):
            if (isinstance(module, nn.Linear) and not name.startswith("adaLN_modulation")
                    and fp8_eligible(module)):
                parent_name, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent_name) if parent_name else block, child,
                        Float8Linear(module))
    view.is_float8_view = True      # what SRA checks (through a torch.compile wrapper too)
    return view.eval().requires_grad_(False)
