"""DeadActivationMonitor: dead ReLUs and saturated tanh/sigmoid units, wherever the activation is written."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from lightning_debug.base import DiagnosticCallback
from lightning_debug.distributed import reduce

# ---------------------------------------------------------------------------------------------- activations
# Ops whose units "die" when their output is never positive, and ops that saturate.
DEAD_OPS: tuple[str, ...] = (
    "relu", "relu6", "leaky_relu", "prelu", "elu", "selu", "celu", "gelu", "silu", "mish", "hardswish",
)  # fmt: skip
SATURATING_OPS: tuple[str, ...] = ("tanh", "sigmoid")


def _activation_functions() -> dict[Any, str]:
    """Every function / tensor method that computes an activation, as ``__torch_function__`` sees it."""
    candidates: list[tuple[str, str, str]] = [
        ("relu", "F", "relu"), ("relu", "torch", "relu"), ("relu", "torch", "relu_"),
        ("relu", "Tensor", "relu"), ("relu", "Tensor", "relu_"),
        ("relu6", "F", "relu6"), ("hardtanh", "F", "hardtanh"), ("hardtanh", "F", "hardtanh_"),
        ("leaky_relu", "F", "leaky_relu"), ("leaky_relu", "F", "leaky_relu_"),
        ("prelu", "F", "prelu"), ("prelu", "torch", "prelu"),
        ("elu", "F", "elu"), ("elu", "F", "elu_"),
        ("selu", "F", "selu"), ("selu", "torch", "selu"), ("selu", "torch", "selu_"),
        ("celu", "F", "celu"), ("celu", "torch", "celu"), ("celu", "torch", "celu_"),
        ("gelu", "F", "gelu"), ("silu", "F", "silu"), ("mish", "F", "mish"), ("hardswish", "F", "hardswish"),
        ("tanh", "torch", "tanh"), ("tanh", "torch", "tanh_"), ("tanh", "Tensor", "tanh"), ("tanh", "Tensor", "tanh_"),
        ("tanh", "F", "tanh"),
        ("sigmoid", "torch", "sigmoid"), ("sigmoid", "torch", "sigmoid_"), ("sigmoid", "Tensor", "sigmoid"),
        ("sigmoid", "Tensor", "sigmoid_"), ("sigmoid", "F", "sigmoid"), ("sigmoid", "special", "expit"),
    ]  # fmt: skip
    namespaces = {"F": F, "torch": torch, "Tensor": torch.Tensor, "special": torch.special}
    functions: dict[Any, str] = {}
    for op, namespace, attribute in candidates:
        function = getattr(namespaces[namespace], attribute, None)
        if function is not None:
            functions.setdefault(function, op)
    return functions


_FUNCTIONS = _activation_functions()

# Activation modules: a call inside one of these is named after the module itself.
_ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardtanh, nn.Tanh, nn.Sigmoid,
)  # fmt: skip
# Layers after which a 3-D activation is (batch, channels, length) rather than (batch, time, features).
_CHANNELS_FIRST: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm)
_FEATURES_LAST: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Bilinear, nn.LayerNorm, nn.Embedding, nn.RNNBase, nn.MultiheadAttention,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)  # fmt: skip

# Modules with a fused inference path (``torch._transformer_encoder_layer_fwd``, ``torch._native_multi_head_attention``)
# that PyTorch takes in eval mode only without any torch function mode (and, for the encoder layer, without forward
# hooks in its subtree): while it may be taken, they run with the recorder paused and unhooked.
_FAST_PATH: tuple[type[nn.Module], ...] = (nn.TransformerEncoder, nn.TransformerEncoderLayer, nn.MultiheadAttention)

_TANH_GAIN = 5.0 / 3.0  # nn.init.calculate_gain("tanh")


def _hardtanh_op(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """``F.hardtanh`` with a lower bound of 0 (how ``nn.ReLU6`` is written) is a ReLU; other bounds are not tracked."""
    low = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
    return "relu6" if isinstance(low, (int, float)) and low >= 0 else None


def _negative_slope(args: tuple[Any, ...], kwargs: dict[str, Any]) -> float | None:
    """The ``negative_slope`` of an ``F.leaky_relu`` call (``nn.LeakyReLU`` passes it positionally)."""
    slope = args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01)
    return float(slope) if isinstance(slope, (int, float)) and not isinstance(slope, bool) else None


def _is_loss(module: nn.Module) -> bool:
    """A loss module: activations in it (a hinge's ``F.relu(margin - pos + neg)``) act on losses, not on features."""
    return isinstance(module, nn.modules.loss._Loss) or type(module).__name__.endswith("Loss")


def _may_take_fast_path(module: nn.Module) -> bool:
    """Whether PyTorch's fused inference path may run somewhere in ``module`` (an encoder, encoder layer or
    attention): it needs the fast path enabled and a module in eval mode whose weights are frozen or run without
    grad. Other conditions (mask layout, batch_first, even heads, the input's ``requires_grad``) are left to
    PyTorch: the recorder stays out whenever the path is possible."""
    if not getattr(torch.backends.mha, "get_fastpath_enabled", lambda: True)():
        return False
    grad = torch.is_grad_enabled()
    return any(
        isinstance(sub, _FAST_PATH)
        and not sub.training
        and not (grad and any(p.requires_grad for p in sub.parameters()))
        for sub in module.modules()
    )


# ---------------------------------------------------------------------------------------------- recording
@dataclass
class _Site:
    """The accumulated counts of one activation call site over the current window (on the device)."""

    name: str
    op: str
    units: int
    caller: str
    producer: str | None
    hits: Tensor  # per unit: values > 0 (dead ops) or values in the saturated region (saturating ops)
    abs_sum: Tensor  # per unit: sum of |activation|, for the dormant score
    values_per_unit: int = 0
    negative_slope: float | None = None  # leaky_relu: for the init gain

    @property
    def kind(self) -> str:
        return "dead" if self.op in DEAD_OPS else "saturated"


@dataclass
class _Frame:
    path: str
    suffix: str
    module: nn.Module
    unwatched: bool = False  # a loss module (or inside one), or a module run on its fused path: nothing recorded
    op_calls: dict[str, int] = field(default_factory=dict)
    child_calls: dict[str, int] = field(default_factory=dict)


class _ActivationRecorder(TorchFunctionMode):
    """Intercepts activation calls during one measured step and counts, per unit, how they behave.

    Forward pre/post hooks on every module keep a stack of the forwards running, so each call is
    attributed to the module whose ``forward`` made it. Everything stays on the device.
    """

    def __init__(
        self, tanh_threshold: float, sigmoid_bounds: tuple[float, float], histogram_samples: int | None
    ) -> None:
        super().__init__()
        self.tanh_threshold = tanh_threshold
        self.sigmoid_low, self.sigmoid_high = sigmoid_bounds
        self.histogram_samples = histogram_samples
        self.sites: dict[str, _Site] = {}
        self.output_sites: set[str] = set()
        self.samples: dict[str, Tensor] = {}
        self.active = False
        self._handles: list[Any] = []
        self._stack: list[_Frame] = []
        self._outer_calls: dict[str, int] = {}
        self._forward_outputs: list[tuple[Tensor, str]] = []
        self._axis_hint: str | None = None
        self._last_weighted: str | None = None
        self._root_name = "model"
        self._capture = False
        self._paused: nn.Module | None = None
        self.compiled: list[str] = []  # torch.compile'd submodules: run as compiled, their activations not seen

    # ------------------------------------------------------------------ switch on / off
    def attach(self, model: nn.Module, capture_samples: bool) -> None:
        if self.active:
            return
        self._root_name = type(model).__name__
        self._capture = capture_samples and self.histogram_samples is not None
        self._stack.clear()
        self._outer_calls.clear()
        self._forward_outputs.clear()
        self._axis_hint = self._last_weighted = None
        self.compiled = [name for name, module in model.named_modules() if _is_compiled(module)]
        compiled = {id(sub) for module in model.modules() if _is_compiled(module) for sub in module.modules()}
        fast_path: set[int] = set()  # encoders / attention (and their submodules): hooked per call, see below
        for name, module in model.named_modules():
            if id(module) in fast_path:
                continue
            if isinstance(module, _FAST_PATH) and id(module) not in compiled:
                fast_path.update(id(sub) for sub in module.modules())
                self._handles.append(_FastPathCall(self, name, module))
                continue
            self._handles += self._hook(name, module)
        self.__enter__()
        self.active = True

    def _hook(self, name: str, module: nn.Module) -> list[Any]:
        """Put the module-stack hooks on ``module``; returns what to ``remove()``."""
        if isinstance(module, _OptimizedModule):  # torch.compile(module): its call runs without the mode
            return [
                module.register_forward_pre_hook(self._pause),
                module.register_forward_hook(self._resume, always_call=True),
            ]
        handles: list[Any] = []
        if getattr(module, "_compiled_call_impl", None) is not None:  # module.compile(): hooks would run inside
            handles.append(_PausedCall(self, module))
        handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
        handles.append(module.register_forward_hook(self._post_hook(name), always_call=True))
        return handles

    def _fast_path_call(
        self, name: str, module: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Call an encoder / encoder layer / attention module. While PyTorch's fused inference path may run in it
        (eval mode, e.g. a frozen teacher), it runs with the mode paused and without hooks, as between measured
        steps: the mode and hooks would send it down the slower path, whose results differ in the last bits.
        Otherwise (training mode) it is hooked for this call and watched like any other module."""
        if _is_compiling():
            return forward(*args, **kwargs)
        if _may_take_fast_path(module):
            self._pause(module, args)
            frame = _Frame(name, "", module, unwatched=True)  # should the mode stay on (another mode above it)
            self._stack.append(frame)
            try:
                return forward(*args, **kwargs)
            finally:
                if self._stack and self._stack[-1] is frame:
                    self._stack.pop()
                self._resume(module, args, None)
                self._axis_hint, self._last_weighted = "features", None
        handles = [
            handle
            for sub_name, sub in module.named_modules(prefix=name)
            if sub is not module
            for handle in self._hook(sub_name, sub)
        ]
        self._pre_hook(name)(module, args)
        output = None
        try:
            output = forward(*args, **kwargs)
            return output
        finally:
            for handle in handles:
                handle.remove()
            self._post_hook(name)(module, args, output)

    def detach(self) -> None:
        if not self.active:
            return
        if self._paused is None:
            self.__exit__(None, None, None)
        self._paused = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stack.clear()
        self._forward_outputs.clear()
        self.active = False

    def reset_window(self) -> None:
        self.sites.clear()

    def _pause(self, module: nn.Module, args: Any) -> None:
        """Before a ``torch.compile``d submodule: leave the mode (when it is the innermost one), so the compiled
        graph runs as it does between measured steps; :meth:`_resume` enters it again."""
        if self.active and self._paused is None and _current_function_mode() is self:
            self.__exit__(None, None, None)
            self._paused = module

    def _resume(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._paused is module:
            self._paused = None
            self.__enter__()

    # ------------------------------------------------------------------ module stack
    def _pre_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            if _is_compiling():  # traced into a compiled graph: leave the graph as it is
                return
            calls = self._stack[-1].child_calls if self._stack else self._outer_calls
            index = calls.get(name, 0)
            calls[name] = index + 1
            outer = self._stack[-1] if self._stack else None
            suffix = (outer.suffix if outer else "") + (f"_call{index + 1}" if index else "")
            unwatched = (outer is not None and outer.unwatched) or (bool(name) and _is_loss(module))
            self._stack.append(_Frame(name, suffix, module, unwatched=unwatched))

        return hook

    def _post_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if _is_compiling():
                return
            if not self._stack or self._stack[-1].module is not module:
                return
            frame = self._stack[-1]
            if isinstance(module, nn.RNN) and module.nonlinearity in ("tanh", "relu") and not frame.unwatched:
                sequence = output[0] if isinstance(output, tuple) else output
                sequence = getattr(sequence, "data", sequence)  # PackedSequence
                # the hidden units are the last dim, whatever layer ran before
                self._record(sequence, module.nonlinearity, self._module_site(frame), None, name, dim=-1)
            self._stack.pop()
            if any(True for _ in module.parameters(recurse=False)):
                if isinstance(module, _CHANNELS_FIRST):
                    self._axis_hint = "channels"
                elif isinstance(module, _FEATURES_LAST):
                    self._axis_hint = "features"
                weight = getattr(module, "weight", None)
                if isinstance(weight, Tensor) and weight.ndim >= 2:
                    self._last_weighted = name
            if not self._stack:
                self._mark_output_sites(output)

        return hook

    def _mark_output_sites(self, output: Any) -> None:
        """Activations returned as the model's output (e.g. sigmoid probabilities) are saturated by design; so are
        those returned as a view (``.squeeze(-1)``, ``.view(batch, *shape)``): the same storage."""
        leaves = [(leaf, _storage(leaf)) for leaf in tree_leaves(output) if isinstance(leaf, Tensor)]
        for tensor, site in self._forward_outputs:
            storage = _storage(tensor)
            if any(
                leaf is tensor or (storage is not None and leaf_storage == storage) for leaf, leaf_storage in leaves
            ):
                self.output_sites.add(site)
        self._forward_outputs.clear()

    def _module_site(self, frame: _Frame) -> str:
        return (frame.path or self._root_name) + frame.suffix

    def _call_site(self, frame: _Frame, op: str) -> str:
        index = frame.op_calls.get(op, 0)
        frame.op_calls[op] = index + 1
        if isinstance(frame.module, _ACTIVATION_MODULES) and sum(frame.op_calls.values()) == 1:
            return self._module_site(frame)
        prefix = f"{frame.path}." if frame.path else ""
        return f"{prefix}{op}_{index}{frame.suffix}"

    # ------------------------------------------------------------------ interception
    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if _is_compiling():  # traced into a compiled graph: the call as it is
            return func(*args, **kwargs)
        try:
            op = _FUNCTIONS.get(func)
        except TypeError:  # an unhashable callable
            op = None
        if op == "hardtanh":
            op = _hardtanh_op(args, kwargs)
        if op is None or not self._stack or self._stack[-1].unwatched:
            return func(*args, **kwargs)
        frame = self._stack[-1]
        site = self._call_site(frame, op)
        if self._capture and site not in self.samples and args and isinstance(args[0], Tensor):
            # copied before the call: an in-place activation overwrites its input
            self.samples[site] = args[0].detach().flatten()[: self.histogram_samples].clone()
        output = func(*args, **kwargs)
        slope = _negative_slope(args, kwargs) if op == "leaky_relu" else None
        self._record(output, op, site, self._last_weighted, frame.path or self._root_name, negative_slope=slope)
        return output

    def _unit_dim(self, ndim: int) -> int:
        if ndim <= 2:
            return ndim - 1
        if self._axis_hint == "channels":
            return 1
        if self._axis_hint == "features":
            return ndim - 1
        return 1 if ndim >= 4 else ndim - 1

    def _record(
        self,
        output: Any,
        op: str,
        name: str,
        producer: str | None,
        caller: str,
        dim: int | None = None,
        negative_slope: float | None = None,
    ) -> None:
        # fewer than 2 dims: no feature axis (a per-sample loss term, an unbatched vector), nothing to call a unit
        if not isinstance(output, Tensor) or not output.is_floating_point() or output.ndim < 2:
            return
        if output.numel() == 0:
            return
        dim = self._unit_dim(output.ndim) if dim is None else dim % output.ndim
        units = int(output.shape[dim])
        site = self.sites.get(name)
        if site is None:
            site = _Site(
                name=name,
                op=op,
                units=units,
                caller=caller,
                producer=producer,
                hits=torch.zeros(units, dtype=torch.int64, device=output.device),
                abs_sum=torch.zeros(units, dtype=torch.float32, device=output.device),
                negative_slope=negative_slope,
            )
            self.sites[name] = site
        elif site.units != units or site.hits.device != output.device:
            return  # the same call site changed width (dynamic shapes): keep the first width
        with torch.no_grad():
            values = output.detach()
            if values.dtype in (torch.float16, torch.bfloat16):
                values = values.float()
            if op in DEAD_OPS:
                hits = values > 0
            elif op == "tanh":
                hits = values.abs() > self.tanh_threshold
            else:
                hits = (values < self.sigmoid_low) | (values > self.sigmoid_high)
            other_dims = [d for d in range(values.ndim) if d != dim]
            if other_dims:
                site.hits += hits.sum(dim=other_dims)
                site.abs_sum += values.abs().sum(dim=other_dims)
            else:
                site.hits += hits
                site.abs_sum += values.abs()
        site.values_per_unit += output.numel() // units
        self._forward_outputs.append((output, name))


_OptimizedModule = torch._dynamo.eval_frame.OptimizedModule
# True while dynamo traces (torch >= 2.3; older versions: never, the hooks then behave as before)
_is_compiling: Callable[[], bool] = getattr(torch.compiler, "is_compiling", lambda: False)


class _PausedCall:
    """Wraps the compiled call of a module compiled in place (``module.compile()``) so that it runs without the
    recorder's mode, as a ``torch.compile`` wrapper's pre/post hooks arrange; ``remove()`` puts the call back."""

    def __init__(self, recorder: _ActivationRecorder, module: nn.Module) -> None:
        self.module = module
        compiled: Callable[..., Any] = module._compiled_call_impl  # type: ignore[assignment]

        def call(*args: Any, **kwargs: Any) -> Any:
            recorder._pause(module, args)
            try:
                return compiled(*args, **kwargs)
            finally:
                recorder._resume(module, args, None)

        self.compiled = compiled
        module._compiled_call_impl = call

    def remove(self) -> None:
        self.module._compiled_call_impl = self.compiled


class _FastPathCall:
    """Routes the calls of an encoder / encoder layer / attention module through
    :meth:`_ActivationRecorder._fast_path_call` (an instance ``forward``: hooks on the module would turn off its fused
    path); ``remove()`` puts the module's own ``forward`` back."""

    def __init__(self, recorder: _ActivationRecorder, name: str, module: nn.Module) -> None:
        self.module = module
        self.own = module.__dict__.get("forward")  # an instance-level forward set before, restored on remove()
        forward = module.forward

        def call(*args: Any, **kwargs: Any) -> Any:
            return recorder._fast_path_call(name, module, forward, args, kwargs)

        module.__dict__["forward"] = call

    def remove(self) -> None:
        if self.own is None:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.__dict__["forward"] = self.own


def _storage(tensor: Tensor) -> tuple[torch.device, int] | None:
    """The device and address of ``tensor``'s storage (shared by its views); None where it has none."""
    try:
        pointer = tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):  # no storage to compare: matched by identity only
        # (sparse layouts raise NotImplementedError; wrapper subclasses may raise the others)
        return None
    return (tensor.device, pointer) if pointer else None


def _is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` runs compiled: the wrapper ``torch.compile(module)`` returns, or ``module.compile()``."""
    return isinstance(module, _OptimizedModule) or getattr(module, "_compiled_call_impl", None) is not None


def _current_function_mode() -> Any:
    """The innermost torch function mode now active (None without one)."""
    stack_len = torch._C._len_torch_function_stack()
    return torch._C._get_function_stack_at(stack_len - 1) if stack_len else None


# ---------------------------------------------------------------------------------------------- callback
class DeadActivationMonitor(DiagnosticCallback):
    r"""Checklist items "dead ReLUs" and "saturated tanh / sigmoid": which units stopped learning, per layer.

    On measured steps (every ``every_n_steps`` optimizer steps, default ``2 * Trainer(log_every_n_steps)``)
    it switches on a :class:`torch.overrides.TorchFunctionMode` plus forward hooks for the forward of
    ``training_step`` and switches them off again before ``backward``; between measured steps nothing
    is attached and training runs at full speed. While on, it sees every activation wherever it is
    written:

    - activation modules: ``nn.ReLU``, ``ReLU6``, ``LeakyReLU``, ``PReLU``, ``ELU``, ``SELU``, ``CELU``,
      ``GELU``, ``SiLU``, ``Mish``, ``Hardswish``, ``Tanh``, ``Sigmoid``;
    - functions and tensor methods called in any ``forward``: ``F.relu``, ``torch.relu``, ``x.relu()``,
      ``F.gelu``, ``F.silu``, ``F.leaky_relu``, ``F.elu``, ``torch.tanh``, ``x.tanh()``, ``torch.sigmoid``,
      ``x.sigmoid()``, ``torch.special.expit`` …, and their in-place forms (``relu_``, ``F.relu(inplace=True)``);
    - the hidden states of ``nn.RNN`` (tanh or relu), whose non-linearity runs inside the kernel.

    Each is named after the module whose ``forward`` called it (the monitored values and the output are
    untouched; training stays bit-identical):

    ===========================  ====================================================================
    name                         what it is
    ===========================  ====================================================================
    ``acts.0``                   an activation module (its dotted path); ``act_call2`` is the second
                                 call of a module shared between layers
    ``relu_0``, ``tanh_1``       the first ``relu`` / second ``tanh`` called in the LightningModule's
                                 own ``forward``
    ``encoder.block.gelu_0``     the first ``gelu`` called in ``encoder.block``'s ``forward``
    ``rnn``                      the hidden states of an ``nn.RNN``
    ===========================  ====================================================================

    Findings also name the layer that feeds the activation (the last module with a weight matrix that
    ran before it, e.g. ``layers.0``). Not seen:

    - activations computed directly in ``training_step``, outside every module's ``forward``;
    - activations inside a loss module (an ``nn.modules.loss._Loss``, or any module whose class name ends in
      ``Loss``), e.g. a hinge's ``F.relu(margin - pos + neg)``: they act on loss terms, not on features;
    - outputs with fewer than 2 dims (a per-sample term, an unbatched vector): they have no feature axis;
    - the inside of an ``nn.TransformerEncoder`` / ``TransformerEncoderLayer`` / ``MultiheadAttention`` while
      PyTorch may run it on its fused inference path (eval mode with frozen weights or no grad, e.g. a frozen
      teacher): the mode and hooks would send it down the slower path, whose results differ in the last bits,
      so it runs unwatched as between measured steps. In training mode they are watched like any module.

    **Units.** A unit is a feature of a ``(batch, features)`` output, a channel (dim 1) of a
    ``(batch, channels, ...)`` convolution output, the last dim of a ``(batch, time, features)``
    sequence (a 3-D output is read as channels-first when the layer before it is a convolution or a
    Batch/Instance/GroupNorm, else as features-last), and the hidden units (last dim) of an ``nn.RNN``.

    **Window.** Counts accumulate over ``window`` measured steps (all samples of all micro-batches, on
    every rank), then they are summed across ranks, judged and logged once. A unit is

    - *dead* (ReLU family) when its output was never positive for any value in the window — under DDP
      only when it was never positive on any rank;
    - *saturated* (tanh, sigmoid) when more than ``saturated_share`` (default: half, i.e. its median
      value) of its values in the window lie in the saturated region (``|tanh| > tanh_threshold``;
      sigmoid outside ``sigmoid_bounds``), where the local gradient is below 0.02 (tanh) or 0.01
      (sigmoid): such a unit passes almost no gradient more often than not;
    - *dormant* when its mean ``|activation|`` is at most ``dormant_threshold`` times the layer's
      average (Sokar et al., 2023; logged only).

    Logged scalars (at the last measured step of each window):

    ===========================================  ==========================================================
    tag                                          meaning
    ===========================================  ==========================================================
    ``activations/<layer>/dead_fraction``        share of units never positive in the window (ReLU family)
    ``activations/<layer>/saturated_fraction``   share of saturated units (tanh, sigmoid)
    ``activations/<layer>/dormant_fraction``     share of dormant units (every activation)
    ``activations/<layer>/pre_activation``       histogram of the activation's input on measured steps
                                                 (TensorBoard, only with ``log_histograms=True``)
    ===========================================  ==========================================================

    Findings:

    ==================================  ========  =============================================================
    check                               severity  raised when
    ==================================  ========  =============================================================
    ``activations.dead``                warning   more than ``dead_threshold`` of a layer's units are dead; says
                                                  whether they were dead from the first window (init, input scale)
                                                  or from which step the dead share grew (learning rate), with the
                                                  feeding layer's weight std vs Kaiming init and its bias
    ``activations.saturated``           warning   more than ``saturated_threshold`` of a tanh/sigmoid layer's
                                                  units are saturated, with the weight std vs Xavier init (now
                                                  and when training started: weights at a standard scale point
                                                  at the inputs, weights that grew at the LR). An activation
                                                  whose result the outermost module call returns as is or as
                                                  a view (the model's output, e.g. sigmoid
                                                  probabilities, ``.squeeze(-1)``-ed or not) is logged but not
                                                  judged: a confident model saturates it by design
    ``activations.none_found``          info      no activation ran inside any module's ``forward``
    ``activations.compiled``            info      ``torch.compile``\ d submodules run as compiled: the activations
                                                  inside them are not seen (instrumenting them would change
                                                  their graph and the training's numerics)
    ``activations.inconsistent_ranks``  info      the ranks saw different activation sites in a window (e.g.
                                                  data-dependent branches); that window is skipped
    ==================================  ========  =============================================================

    A layer is reported once when it crosses the threshold, and again only after it has recovered.
    On resume from a checkpoint the history and the reported layers are restored; a window that was
    cut by the checkpoint starts again. Under manual optimization the forwards up to the first
    ``manual_backward`` of a measured step are seen. Cost: on measured steps a few reductions per
    activation, on the device; one host transfer (and one cross-rank reduce) per window.

    Args:
        every_n_steps: measure every this many optimizer steps; ``None``: every ``2 * Trainer(log_every_n_steps)``
            steps (100 at Lightning's default).
        window: how many measured steps a window accumulates before its units are judged (>= 1).
        dead_threshold: warn when more than this share of a layer's units is dead, in (0, 1); default 0.5.
        saturated_threshold: warn when more than this share of a layer's units is saturated, in (0, 1).
        saturated_share: a unit is saturated when more than this share of its values is saturated, in (0, 1];
            default 0.5 (its median value is saturated).
        tanh_threshold: ``|tanh(x)|`` above this is saturated, in (0, 1); default 0.99.
        sigmoid_bounds: ``(low, high)``: sigmoid outputs below ``low`` or above ``high`` are saturated,
            with ``0 < low < 0.5 < high < 1``; default ``(0.01, 0.99)``.
        dormant_threshold: a unit whose mean ``|activation|`` is at most this times the layer average is
            dormant (>= 0; default 0.025).
        log_histograms: log a histogram of each activation's input to TensorBoard on measured steps
            (one extra host transfer per measured step).
        histogram_samples: how many values per activation the histogram keeps (>= 1).

    Raises:
        ValueError: when an argument is out of range (the message names it and the accepted values).

    Example::

        from lightning_debug import DeadActivationMonitor

        trainer = Trainer(callbacks=[DeadActivationMonitor(every_n_steps=50, window=4)])
        trainer.fit(model, datamodule)
        # tensorboard: activations/<layer>/dead_fraction; findings: activations.dead, activations.saturated
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        *,
        window: int = 4,
        dead_threshold: float = 0.5,
        saturated_threshold: float = 0.5,
        saturated_share: float = 0.5,
        tanh_threshold: float = 0.99,
        sigmoid_bounds: tuple[float, float] = (0.01, 0.99),
        dormant_threshold: float = 0.025,
        log_histograms: bool = False,
        histogram_samples: int = 4096,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps)
        _validate(
            window, dead_threshold, saturated_threshold, saturated_share, tanh_threshold, sigmoid_bounds,
            dormant_threshold, histogram_samples,
        )  # fmt: skip
        self.window = window
        self.dead_threshold = float(dead_threshold)
        self.saturated_threshold = float(saturated_threshold)
        self.saturated_share = float(saturated_share)
        self.tanh_threshold = float(tanh_threshold)
        self.sigmoid_bounds = (float(sigmoid_bounds[0]), float(sigmoid_bounds[1]))
        self.dormant_threshold = float(dormant_threshold)
        self.log_histograms = bool(log_histograms)
        self.histogram_samples = histogram_samples
        self._recorder = _ActivationRecorder(
            self.tanh_threshold, self.sigmoid_bounds, histogram_samples if self.log_histograms else None
        )
        self._measuring_step: int | None = None
        self._window_steps: list[int] = []
        # what survives a checkpoint
        self.history: dict[str, list[list[float]]] = {}  # layer -> [[step, judged fraction], ...]
        self.latest: dict[str, dict[str, Any]] = {}  # layer -> the last window's numbers
        self.flagged: dict[str, list[str]] = {"dead": [], "saturated": []}
        self.windows = 0
        self._none_found_reported = False
        self._compiled_reported = False
        self._inconsistent_reported = False
        self._start_stds: dict[str, float] = {}  # layer -> its weight std when this fit's training started

    # ------------------------------------------------------------------ hooks
    def doze_hooks(self) -> tuple[str, ...]:
        return ("on_train_batch_start", "on_before_backward", "on_train_batch_end")

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._measuring_step is not None and trainer.global_step != self._measuring_step:
            self._finish_measured_step(trainer)
        if self.is_measured_step(trainer):
            self._measuring_step = int(trainer.global_step)
            self._recorder.attach(pl_module, capture_samples=self.log_histograms and trainer.is_global_zero)
            if self._recorder.compiled and not self._compiled_reported:
                self._compiled_reported = True
                self.report(
                    trainer, "activations.compiled", "info",
                    f"{len(self._recorder.compiled)} torch.compile'd submodule(s) run as compiled on measured steps, "
                    "so the activations inside their compiled calls are not seen: "
                    f"{self._recorder.compiled[:10]} (watching them would change their compiled graph, and with it the "
                    "training's numerics).",
                    "To check them for dead or saturated units, train a few hundred steps without torch.compile "
                    "(same seed); the activations outside them are watched as usual.",
                    {"compiled": self._recorder.compiled},
                )  # fmt: skip

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._recorder.detach()  # backward and the optimizer step run without the mode

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._recorder.detach()
        if self._measuring_step is not None and trainer.global_step != self._measuring_step:
            self._finish_measured_step(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # every layer weight's std as training starts (one transfer, once): the saturated hint tells an init too
        # large from weights that grew in training
        named = [(name, getattr(module, "weight", None)) for name, module in pl_module.named_modules()]
        weights = [(name, w) for name, w in named if isinstance(w, Tensor) and w.ndim >= 2 and w.numel() > 1]
        self._start_stds = {}
        if weights:
            device = weights[0][1].device
            stds = torch.stack([w.detach().float().std().to(device) for _, w in weights]).cpu().tolist()
            self._start_stds = {name: std for (name, _), std in zip(weights, stds)}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._recorder.detach()
        if self._measuring_step is not None:
            self._finish_measured_step(trainer, force_close=True)
        elif self._window_steps:
            self._close_window(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._recorder.detach()

    # ------------------------------------------------------------------ measure
    def _finish_measured_step(self, trainer: pl.Trainer, force_close: bool = False) -> None:
        assert self._measuring_step is not None
        self._window_steps.append(self._measuring_step)
        self._measuring_step = None
        if self._recorder.samples:
            self._log_histograms(trainer, self._window_steps[-1])
        if len(self._window_steps) >= self.window or force_close:
            self._close_window(trainer)

    def _log_histograms(self, trainer: pl.Trainer, step: int) -> None:
        names = sorted(self._recorder.samples)
        samples = [self._recorder.samples[name] for name in names]
        self._recorder.samples.clear()
        flat = torch.cat([s.float() for s in samples]).cpu()  # one transfer for every layer
        for name, values in zip(names, torch.split(flat, [s.numel() for s in samples])):
            self.log_histogram(trainer, f"activations/{name}/pre_activation", values, step=step)

    def _close_window(self, trainer: pl.Trainer) -> None:
        steps = list(self._window_steps)
        self._window_steps.clear()
        sites = [self._recorder.sites[name] for name in sorted(self._recorder.sites)]
        self._recorder.reset_window()
        device = sites[0].hits.device if sites else trainer.strategy.root_device
        if not self._ranks_agree(trainer, sites, device):
            if not self._inconsistent_reported:
                self._inconsistent_reported = True
                self.report(
                    trainer, "activations.inconsistent_ranks", "info",
                    f"The ranks ran different activations in the window of steps {steps[0]}-{steps[-1]} "
                    "(data-dependent branches or shapes), so their unit counts cannot be combined; the window "
                    "was skipped.",
                    "Nothing to fix if the model branches on its data; otherwise look for rank-dependent code paths.",
                )  # fmt: skip
            return
        if not sites:
            self._report_none_found(trainer)
            return
        measured = self._reduce_counts(trainer, sites, device)
        self.windows += 1
        self._judge(trainer, measured, steps)
        self._log(trainer, measured, steps[-1])

    def _ranks_agree(self, trainer: pl.Trainer, sites: list[_Site], device: torch.device) -> bool:
        """The reduce below needs the same sites (same sizes, same order) on every rank."""
        if trainer.world_size <= 1:
            return True
        signature = float(zlib.crc32(";".join(f"{s.name}|{s.op}|{s.units}" for s in sites).encode()))
        dtype = torch.float32 if device.type == "mps" else torch.float64
        extremes = reduce(trainer, torch.tensor([signature, -signature], dtype=dtype, device=device), "max")
        high, neg_low = extremes.cpu().tolist()
        return high == -neg_low

    def _reduce_counts(self, trainer: pl.Trainer, sites: list[_Site], device: torch.device) -> dict[str, Any]:
        dtype = torch.float32 if device.type == "mps" else torch.float64
        parts: list[Tensor] = []
        for site in sites:
            parts += [site.hits.to(dtype), site.abs_sum.to(dtype), torch.tensor([site.values_per_unit], dtype=dtype)]
        totals = reduce(trainer, torch.cat([p.to(device) for p in parts]), "sum").cpu()  # the one host transfer
        measured: dict[str, Any] = {}
        offset = 0
        for site in sites:
            hits = totals[offset : offset + site.units]
            abs_sum = totals[offset + site.units : offset + 2 * site.units]
            values = float(totals[offset + 2 * site.units])
            offset += 2 * site.units + 1
            mean_abs = abs_sum / max(values, 1.0)
            layer_mean = float(mean_abs.mean())
            dormant = (mean_abs <= self.dormant_threshold * layer_mean) if layer_mean > 0 else torch.ones_like(hits)
            entry: dict[str, Any] = {
                "op": site.op,
                "kind": site.kind,
                "units": site.units,
                "values_per_unit": int(values),
                "caller": site.caller,
                "producer": site.producer,
                "is_output": site.name in self._recorder.output_sites,
                "dormant_fraction": float(dormant.double().mean()),
            }
            if site.negative_slope is not None:
                entry["negative_slope"] = site.negative_slope
            if site.kind == "dead":
                dead = hits == 0
                entry.update(dead_units=int(dead.sum()), dead_fraction=float(dead.double().mean()))
            else:
                saturated = hits > self.saturated_share * values
                entry.update(saturated_units=int(saturated.sum()), saturated_fraction=float(saturated.double().mean()))
            measured[site.name] = entry
        return measured

    # ------------------------------------------------------------------ judge
    def _judge(self, trainer: pl.Trainer, measured: dict[str, Any], steps: list[int]) -> None:
        for name, entry in measured.items():
            kind = entry["kind"]
            fraction = entry[f"{kind}_fraction"]
            history = self.history.setdefault(name, [])
            history.append([steps[-1], fraction])
            del history[:-1000]
            self.latest[name] = {**entry, "window_steps": [steps[0], steps[-1]]}
            threshold = self.dead_threshold if kind == "dead" else self.saturated_threshold
            flagged = self.flagged[kind]
            if fraction <= threshold:
                if name in flagged:
                    flagged.remove(name)  # recovered: report again if it crosses the threshold again
                continue
            if name in flagged or (kind == "saturated" and entry["is_output"]):
                continue
            flagged.append(name)
            weights = _weight_stats(
                trainer.lightning_module, entry["producer"], entry["op"], entry.get("negative_slope")
            )
            data = {"layer": name, **self.latest[name], **weights, "history": history[-20:]}
            if kind == "dead":
                self._report_dead(trainer, name, entry, steps, history, weights, data)
            else:
                self._report_saturated(trainer, name, entry, steps, history, weights, data)

    def _report_dead(
        self,
        trainer: pl.Trainer,
        name: str,
        entry: dict[str, Any],
        steps: list[int],
        history: list[list[float]],
        weights: dict[str, Any],
        data: dict[str, Any],
    ) -> None:
        grew_from = _growth_start(history)
        if grew_from is None:
            story = (
                f"It was already {history[0][1]:.0%} in the first window (ending at step {int(history[0][0])}): "
                "the units were dead from the start, which points at the initialisation or the input scale."
            )
            data["dead_since_first_window"] = True
        else:
            story = (
                f"The dead share grew during training: {grew_from[1]:.0%} at step {int(grew_from[0])}, "
                f"{entry['dead_fraction']:.0%} now; the units have been dying since step {int(grew_from[0])}, "
                "which points at too high a learning rate."
            )
            data["growing_since_step"] = int(grew_from[0])
        message = (
            f"`{name}` ({entry['op']} {_where(entry)}): {entry['dead_units']}/{entry['units']} units "
            f"({entry['dead_fraction']:.0%}) never had a positive output in {entry['values_per_unit']} values per "
            f"unit {_steps_words(steps)}; expected at most {self.dead_threshold:.0%}. "
            f"{_dead_consequence(entry)} {story}"
        )
        hints: list[str] = []
        producer = entry["producer"]
        bias = weights.get("bias_mean")
        if bias is not None and bias < 0:
            hints.append(
                f"`{producer}`'s bias averages {bias:.3g}: start it at a small positive value "
                f"(`nn.init.constant_(model.{producer}.bias, 0.01)`)"
            )
        else:
            hints.append("start the bias of the layer before it at a small positive value (0.01)")
        if weights.get("weight_std") is not None:
            slope = entry.get("negative_slope")
            kaiming = "nonlinearity='relu'" if slope is None else f"a={slope:g}, nonlinearity='leaky_relu'"
            hints.append(
                f"check `{producer}`'s init scale: weight std {weights['weight_std']:.3g} vs {weights['init_std']:.3g} "
                f"for Kaiming init (`nn.init.kaiming_normal_(w, {kaiming})`)"
            )
        learning_rate = "lower the learning rate (3-10x) or add warmup"
        hints.insert(0 if grew_from is not None else len(hints), learning_rate)
        hints.append("normalise the inputs (zero mean, unit std)")
        if entry["op"] in ("relu", "relu6"):
            hints.append("or use LeakyReLU(0.01) / GELU, which keep a gradient for negative inputs")
        self.report(trainer, "activations.dead", "warning", message, "; ".join(hints) + ".", data)

    def _report_saturated(
        self,
        trainer: pl.Trainer,
        name: str,
        entry: dict[str, Any],
        steps: list[int],
        history: list[list[float]],
        weights: dict[str, Any],
        data: dict[str, Any],
    ) -> None:
        if entry["op"] == "tanh":
            region, gradient = f"|tanh| > {self.tanh_threshold:g}", 1 - self.tanh_threshold**2
        else:
            low, high = self.sigmoid_bounds
            region, gradient = f"sigmoid < {low:g} or > {high:g}", max(low * (1 - low), high * (1 - high))
        grew_from = _growth_start(history)
        story = (
            f" It grew from {grew_from[1]:.0%} at step {int(grew_from[0])}." if grew_from is not None else
            f" It was already {history[0][1]:.0%} in the first window (ending at step {int(history[0][0])})."
        )  # fmt: skip
        message = (
            f"`{name}` ({entry['op']} {_where(entry)}): {entry['saturated_units']}/{entry['units']} units "
            f"({entry['saturated_fraction']:.0%}) are saturated (more than {self.saturated_share:.0%} of their "
            f"{entry['values_per_unit']} values per unit have {region}, where the local gradient is below "
            f"{gradient:.2g}) {_steps_words(steps)}; expected at most {self.saturated_threshold:.0%}." + story
        )
        hints: list[str] = []
        producer = entry["producer"]
        normalise = "normalise the inputs (zero mean, unit std) or add a LayerNorm/BatchNorm before the activation"
        ratio = weights["weight_std"] / max(weights["init_std"], 1e-12) if weights.get("weight_std") else None
        start = self._start_stds.get(producer) if producer else None
        start_ratio = start / max(weights["init_std"], 1e-12) if start is not None and ratio is not None else None
        if ratio is not None and ratio > 1.5 and start_ratio is not None and start_ratio <= 1.5:
            data["start_weight_std"] = start
            hints.append(normalise)  # weights at a standard scale that grew in training: not the init
            hints.append(
                f"`{producer}`'s weights started at std {start:.3g} ({start_ratio:.2g}x the Xavier init's "
                f"{weights['init_std']:.3g}) and grew to {weights['weight_std']:.3g} in training: the init is not the "
                "cause; lower the learning rate or add weight decay"
            )
        elif ratio is not None and ratio > 1.5:
            hints.append(
                f"`{producer}`'s weight std is {weights['weight_std']:.3g}, {ratio:.2g}x the Xavier init's "
                f"{weights['init_std']:.3g}: initialise it with `nn.init.xavier_normal_(w, gain={weights['gain']:.3g})`"
                f" (or scale it by {1 / ratio:.2g})"
            )
            hints.append(normalise)
        else:  # the weights are not too large: what feeds the layer is (unnormalised inputs, a growing residual)
            hints.append(normalise)
            if ratio is not None:
                hints.append(
                    f"`{producer}`'s weights are not the cause (std {weights['weight_std']:.3g}, "
                    f"{ratio:.2g}x the Xavier init's {weights['init_std']:.3g}): its inputs are too large"
                )
        if "start_weight_std" not in data:  # (else the LR is named above)
            hints.append("lower the learning rate" if grew_from else "if it grows in training, lower the LR")
        hints.append("or use a non-saturating activation (ReLU family) for hidden layers")
        self.report(trainer, "activations.saturated", "warning", message, "; ".join(hints) + ".", data)

    def _report_none_found(self, trainer: pl.Trainer) -> None:
        if self._none_found_reported:
            return
        self._none_found_reported = True
        self.report(
            trainer, "activations.none_found", "info",
            "No activation (ReLU family, tanh, sigmoid, nn.RNN) ran inside any module's forward on the measured "
            "steps, so there are no dead or saturated units to report.",
            "Nothing to fix if the model has no such activations; activations written directly in training_step "
            "are not seen: move the network into forward (or a submodule).",
        )  # fmt: skip

    # ------------------------------------------------------------------ log
    def _log(self, trainer: pl.Trainer, measured: dict[str, Any], step: int) -> None:
        scalars: dict[str, float] = {}
        for name, entry in measured.items():
            scalars[f"activations/{name}/{entry['kind']}_fraction"] = entry[f"{entry['kind']}_fraction"]
            scalars[f"activations/{name}/dormant_fraction"] = entry["dormant_fraction"]
        self.log_scalars(trainer, scalars, step=step)

    # ------------------------------------------------------------------ report / resume
    def summary(self) -> dict[str, Any]:
        layers = {
            name: {
                key: entry[key]
                for key in ("op", "units", "dead_fraction", "saturated_fraction", "dormant_fraction", "is_output")
                if key in entry
            }
            for name, entry in self.latest.items()
        }
        return {"windows": self.windows, "layers": layers}

    def extra_state(self) -> dict[str, Any]:
        return {
            "history": self.history,
            "latest": self.latest,
            "flagged": self.flagged,
            "windows": self.windows,
            "none_found_reported": self._none_found_reported,
            "compiled_reported": self._compiled_reported,
            "inconsistent_reported": self._inconsistent_reported,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.history = {name: [list(row) for row in rows] for name, rows in state.get("history", {}).items()}
        self.latest = dict(state.get("latest", {}))
        flagged = state.get("flagged", {})
        self.flagged = {"dead": list(flagged.get("dead", [])), "saturated": list(flagged.get("saturated", []))}
        self.windows = int(state.get("windows", 0))
        self._none_found_reported = bool(state.get("none_found_reported", False))
        self._compiled_reported = bool(state.get("compiled_reported", False))
        self._inconsistent_reported = bool(state.get("inconsistent_reported", False))


# ---------------------------------------------------------------------------------------------- helpers
def _steps_words(steps: list[int]) -> str:
    return f"at step {steps[0]}" if len(steps) == 1 else f"over the {len(steps)} measured steps {steps[0]}-{steps[-1]}"


def _where(entry: dict[str, Any]) -> str:
    where = f"called in `{entry['caller']}`"
    return f"{where}, after `{entry['producer']}`" if entry.get("producer") else where


def _growth_start(history: list[list[float]]) -> list[float] | None:
    """The window from which the judged fraction has grown to its current value, if it was clearly lower before."""
    if len(history) < 2:
        return None
    current = history[-1][1]
    earlier = history[:-1]
    low = min(fraction for _, fraction in earlier)
    if current - low < 0.1:
        return None
    last_low = max(i for i, (_, fraction) in enumerate(earlier) if fraction == low)
    return earlier[last_low]


def _dead_consequence(entry: dict[str, Any]) -> str:
    """What a never-positive unit of this op still learns."""
    op = entry["op"]
    if op == "leaky_relu" and entry.get("negative_slope") is not None:
        slope = entry["negative_slope"]
        return f"Such units pass only {slope:g}x of their gradient (the negative slope) and learn slowly."
    if op in ("leaky_relu", "prelu"):
        return "Such units pass only the negative slope's share of their gradient and learn slowly."
    if op in ("elu", "selu", "celu"):
        return "Such units sit on the exponential tail, whose gradient vanishes for large negative inputs."
    if op in ("gelu", "silu", "mish", "hardswish"):
        return "Such units sit in the negative tail, where the gradient is small and vanishes further out."
    return "Dead units get no gradient and stop learning."


def _weight_stats(
    model: nn.Module, producer: str | None, op: str, negative_slope: float | None = None
) -> dict[str, Any]:
    """The feeding layer's weight std and bias mean, and the std its init should have for this activation."""
    if not producer:
        return {}
    try:
        module = model.get_submodule(producer)
    except AttributeError:
        return {}
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.ndim < 2 or weight.numel() < 2:
        return {}
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
    if op in DEAD_OPS:
        gain = math.sqrt(2.0 / (1.0 + (negative_slope or 0.0) ** 2))  # nn.init.calculate_gain("leaky_relu", a)
        init_std = gain / math.sqrt(fan_in)
    else:
        gain = _TANH_GAIN if op == "tanh" else 1.0
        init_std = gain * math.sqrt(2.0 / (fan_in + fan_out))
    bias = getattr(module, "bias", None)
    stats = [weight.detach().float().std()]
    if isinstance(bias, Tensor) and bias.numel() > 0:
        stats.append(bias.detach().float().mean())
    values = torch.stack([s.to(weight.device) for s in stats]).cpu().tolist()
    result: dict[str, Any] = {"weight_std": values[0], "init_std": init_std, "gain": gain, "fan_in": fan_in}
    if len(values) > 1:
        result["bias_mean"] = values[1]
    return result


def _validate(
    window: int,
    dead_threshold: float,
    saturated_threshold: float,
    saturated_share: float,
    tanh_threshold: float,
    sigmoid_bounds: tuple[float, float],
    dormant_threshold: float,
    histogram_samples: int,
) -> None:
    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def is_number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if not is_int(window) or window < 1:
        raise ValueError(f"`window` must be a positive integer (measured steps per window), got {window!r}")
    for arg, value in (
        ("dead_threshold", dead_threshold),
        ("saturated_threshold", saturated_threshold),
        ("tanh_threshold", tanh_threshold),
    ):
        if not is_number(value) or not 0 < value < 1:
            raise ValueError(f"`{arg}` must be a number in (0, 1), got {value!r}")
    if not is_number(saturated_share) or not 0 < saturated_share <= 1:
        raise ValueError(f"`saturated_share` must be a number in (0, 1], got {saturated_share!r}")
    if (
        not isinstance(sigmoid_bounds, (tuple, list))
        or len(sigmoid_bounds) != 2
        or not all(is_number(v) for v in sigmoid_bounds)
        or not 0 < sigmoid_bounds[0] < 0.5 < sigmoid_bounds[1] < 1
    ):
        raise ValueError(f"`sigmoid_bounds` must be (low, high) with 0 < low < 0.5 < high < 1, got {sigmoid_bounds!r}")
    if not is_number(dormant_threshold) or dormant_threshold < 0:
        raise ValueError(f"`dormant_threshold` must be a number >= 0, got {dormant_threshold!r}")
    if not is_int(histogram_samples) or histogram_samples < 1:
        raise ValueError(f"`histogram_samples` must be a positive integer, got {histogram_samples!r}")
