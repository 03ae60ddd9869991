"""Weight-only fp8 for the frozen denoiser (`dtype='fp8'`).

Every `nn.Linear` weight is stored as `torch.float8_e4m3fn` with one scale per output channel
(row max / 448, the largest e4m3 value) and dequantised to the compute dtype (bf16) inside each
forward and again inside backward. Activations, biases, norms, embeddings and convolutions stay in
the compute dtype; the LoRA that peft puts on top trains in fp32 as with bf16 weights.

`Fp8Linear` subclasses `nn.Linear`, so peft's LoRA finds and wraps its target layers as before;
its `weight` is a read-only property returning the dequantised matrix (peft reads it for the
device and dtype of new adapters). Backward saves the fp8 weight, not a dequantised copy, so the
gradient window holds no bf16 weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vader.errors import VaderError

__all__ = ["E4M3_MAX", "FP8", "Fp8Linear", "check_fp8_support", "quantize_linears", "quantize_weight"]

FP8: torch.dtype | None = getattr(torch, "float8_e4m3fn", None)
E4M3_MAX = 448.0


def check_fp8_support() -> None:
    """A one-line VaderError when this torch has no float8 dtypes (they arrived in torch 2.1)."""
    if FP8 is None:
        raise VaderError(f"dtype='fp8' needs torch with torch.float8_e4m3fn (2.1 or newer), this is torch "
                         f"{torch.__version__}; use dtype='bf16'")


def quantize_weight(weight: Tensor, compute_dtype: torch.dtype = torch.bfloat16) -> tuple[Tensor, Tensor]:
    """[out, in] weight -> (float8_e4m3fn [out, in], scale [out] in compute_dtype).

    The scale is rounded to the compute dtype before dividing, so that fp8 * scale in forward
    reproduces the quantised value exactly; a row of zeros gets a tiny scale and stays zero.
    """
    check_fp8_support()
    w = weight.detach().float()
    # clamped to the smallest normal number of the compute dtype: a zero row then gives 0 / scale = 0
    scale = (w.abs().amax(dim=1) / E4M3_MAX).clamp_min(torch.finfo(compute_dtype).tiny).to(compute_dtype)
    q = (w / scale.float()[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)
    return q, scale


def _dequantize(q: Tensor, scale: Tensor) -> Tensor:
    return q.to(scale.dtype) * scale[:, None]


class _Fp8LinearFunction(torch.autograd.Function):
    """y = x W^T + b with W dequantised on the fly; only x (and a trainable bias) get gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(q, scale)
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        dtype = scale.dtype
        # Autocast would re-cast the dequantised weight; the compute dtype is the scale's.
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dtype), _dequantize(q, scale), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, Tensor | None]:  # type: ignore[override]
        q, scale = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = _dequantize(q, scale)
            grad_x = (grad.to(w.dtype) @ w).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, grad_bias


class Fp8Linear(nn.Linear):
    """A frozen `nn.Linear` whose weight lives in fp8 (buffer `weight_fp8`, scale `weight_scale`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None, compute_dtype: torch.dtype = torch.bfloat16) -> None:
        check_fp8_support()
        nn.Module.__init__(self)  # not nn.Linear's: it would create a full-precision weight Parameter
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight_fp8", torch.zeros(out_features, in_features, dtype=FP8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=compute_dtype, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16) -> Fp8Linear:
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device,
                  compute_dtype)
        q, scale = quantize_weight(linear.weight, compute_dtype)
        out.weight_fp8.copy_(q)
        out.weight_scale.copy_(scale)
        if linear.bias is not None:
            out.bias.data.copy_(linear.bias.detach())
        return out

    @property  # type: ignore[override]
    def weight(self) -> Tensor:
        """The dequantised weight (a new tensor in the compute dtype): for readers such as peft."""
        return _dequantize(self.weight_fp8, self.weight_scale)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.weight_scale.dtype

    def forward(self, x: Tensor) -> Tensor:
        return _Fp8LinearFunction.apply(x, self.weight_fp8, self.weight_scale, self.bias)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        # Module.to(dtype) / .float() / .half() convert every floating tensor, and float8 counts as
        # one: the fp8 weight follows only the device, so it stays fp8 (the scale and bias follow
        # the dtype, which makes that the new compute dtype).
        q = self._buffers.pop("weight_fp8")
        try:
            super()._apply(fn, recurse)
        finally:
            device = fn(torch.empty(0, device=q.device)).device
            self._buffers["weight_fp8"] = q.to(device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight=float8_e4m3fn x per-channel {self.compute_dtype}")


def quantize_linears(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every plain `nn.Linear` of a frozen model by an `Fp8Linear`, in place; returns the model.

    Must run before LoRA is injected: adapters must stay full precision, so a model that already
    has them is refused.
    """
    check_fp8_support()
    if any("lora_" in name for name, _ in model.named_modules()):
        raise VaderError("fp8 weights must be made before LoRA is added to the model")
    targets = [(name, module) for name, module in model.named_modules() if type(module) is nn.Linear]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Fp8Linear.from_linear(linear, compute_dtype))
    return model
