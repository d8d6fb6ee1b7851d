"""Run extra forward passes without leaving a trace on training.

A monitor that evaluates the model (the loss at init, predictions on a fixed batch, a batch-mixing
probe) must leave training bit-identical: the global RNG streams (which dropout and every new
DataLoader iterator draw from), the loaders' own generators, the random generators a dataset keeps for its
augmentation (numpy, ``random.Random`` or torch generators in its attributes and transforms), BatchNorm running
statistics, each module's train/eval flag, the user's ``self.log`` results and the state of torchmetrics
``Metric`` submodules are all put back exactly. The probes read an ``IterableDataset`` through a copy of it
(:func:`probe_loader`), so a stream that keeps its position on itself is not moved, and never read data that yields
each batch once (:func:`one_shot`). Python attributes a ``training_step`` changes (a list of outputs,
a counter, a scheduler stepped inside it) cannot be restored: keep such state in buffers or metrics.
"""

from __future__ import annotations

import copy
import gc
import random
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from types import BuiltinFunctionType, FunctionType, ModuleType
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch.utils.data import DataLoader, IterableDataset


def probe_loader(loader: Any) -> Any:
    """A loader yielding the same batches as ``loader`` for a few extra passes, without touching its workers or its
    dataset's position.

    A DataLoader with worker processes (``persistent_workers=True`` above all) caches its first iterator, and
    creating it early changes the order in which training later draws its seeds. The probe loads in the main
    process instead, sharing the dataset, batch sampler and collate function.

    An ``IterableDataset`` may keep its position on itself (a stream that continues where it stopped): the probe
    reads a copy of it (:func:`stream_copy`), whatever the number of workers, so training starts where it would
    have started without the probe.

    Raises:
        OneShotLoader: when the loader's ``IterableDataset`` cannot be copied (it holds a socket, a file, a lock, a
            generator, or too many objects): reading it could take batches from training.
    """
    if not isinstance(loader, DataLoader):
        return loader
    if isinstance(loader.dataset, IterableDataset):  # (takes no sampler: batched by the loader itself)
        dataset = stream_copy(loader.dataset)
        if dataset is None:
            raise OneShotLoader(_UNCOPYABLE.format(type(loader.dataset).__name__))
        return DataLoader(
            dataset,
            batch_size=loader.batch_size,
            drop_last=loader.drop_last,
            collate_fn=loader.collate_fn,
            num_workers=0,
            generator=loader.generator,
        )
    if loader.num_workers == 0:
        return loader
    if loader.batch_sampler is not None:
        return DataLoader(
            loader.dataset, batch_sampler=loader.batch_sampler, collate_fn=loader.collate_fn, num_workers=0
        )
    return DataLoader(loader.dataset, batch_size=None, collate_fn=loader.collate_fn, num_workers=0)


COPY_BYTES = 64 << 20
"""Bytes a stream's copy may spend copying its tensors and arrays (:func:`stream_copy`); beyond it they are shared."""

SHARED_LENGTH = 10_000
"""Lists, tuples and dicts longer than this in a stream are its data: shared with the stream's copy, not copied."""

COPY_OBJECTS = 1_000_000
"""A stream made of more objects (containers, tensors, instances) than this is not copied (:func:`stream_copy`)."""


def stream_copy(dataset: IterableDataset) -> IterableDataset | None:
    """A deep copy of ``dataset`` for a probe to iterate, or None when it cannot be copied.

    An ``IterableDataset`` whose ``__iter__`` continues where the last pass stopped (a position counter, an
    iterator or a buffer in its attributes) would start training further on if a probe read the dataset itself;
    its copy starts where the dataset stands and advances alone. A dataset that starts afresh on every ``iter``
    reads the same from its copy. None (and the probes treat the data as read-once) when ``deepcopy`` refuses the
    dataset (it holds a socket, an open file, a lock, a generator object) or it is made of more than
    :data:`COPY_OBJECTS` objects.

    The copy's tensors and numpy arrays cost at most :data:`COPY_BYTES`: the smallest (a position kept in a tensor,
    a random state) are copied, and once that is spent the rest (the examples of an in-memory stream) are shared
    with the dataset, not duplicated; so are its lists, tuples and dicts of more than :data:`SHARED_LENGTH` items
    (its examples). A stream that changes one of those in place during ``__iter__`` (pops from a long list) is not
    protected. Nor is a position kept outside the dataset object (a server-side queue, a consumer group's offsets,
    a pipe): the copy reads from the same source.
    """
    walked = _arrays(dataset)
    if walked is None:
        return None
    arrays, large = walked
    memo: dict[int, Any] = {id(container): container for container in large}
    spent = 0
    for size, array in sorted(arrays, key=lambda item: item[0]):
        spent += size + 512  # (and the tensor object itself)
        if spent > COPY_BYTES:
            memo[id(array)] = array
    try:
        return copy.deepcopy(dataset, memo)
    except Exception:
        return None


_ATOMIC = (str, bytes, int, float, complex, bool, type(None), type, ModuleType, FunctionType, BuiltinFunctionType)


def _arrays(root: Any) -> tuple[list[tuple[int, Any]], list[Any]] | None:
    """The tensors and numpy arrays ``root`` refers to, directly or through its attributes and containers, with
    their sizes in bytes, and the lists, tuples and dicts of more than :data:`SHARED_LENGTH` items it holds (the
    examples of an in-memory stream: shared with the copy, not searched); None when that means visiting more than
    :data:`COPY_OBJECTS` objects. Classes, modules and functions are not searched (``deepcopy`` does not copy them
    either)."""
    found: list[tuple[int, Any]] = []
    large: list[Any] = []
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _ATOMIC):
            continue
        seen.add(id(obj))
        if len(seen) > COPY_OBJECTS:
            return None
        if type(obj) in (list, tuple, dict) and len(obj) > SHARED_LENGTH:
            large.append(obj)
        elif isinstance(obj, torch.Tensor):
            found.append((_tensor_bytes(obj), obj))
        elif isinstance(obj, np.ndarray):
            found.append((obj.nbytes, obj))
        else:
            stack.extend(gc.get_referents(obj))
    return found, large


def _tensor_bytes(tensor: torch.Tensor) -> int:
    """The bytes a deep copy of ``tensor`` allocates: its whole storage (a view is copied with it)."""
    try:
        return int(tensor.untyped_storage().nbytes())
    except Exception:  # (a sparse or other storage-less tensor)
        return tensor.numel() * tensor.element_size()


class OneShotLoader(ValueError):
    """The training data is an iterator that yields each batch once: a probe's read would take batches from training."""


def one_shot(loader: Any) -> bool:
    """Whether iterating ``loader`` consumes it: a generator or other iterator (``iter(x) is x``), or a DataLoader over
    an IterableDataset that is its own iterator. Checked without calling ``iter``: no side effect. (A stream that
    cannot be copied for a probe is found by :func:`probe_loader`, which raises :class:`OneShotLoader`.)"""
    if isinstance(loader, DataLoader):
        return isinstance(loader.dataset, IterableDataset) and isinstance(loader.dataset, Iterator)
    return isinstance(loader, Iterator)


def training_batches(trainer: pl.Trainer) -> tuple[Iterable[Any], list[Any]] | None:
    """The batches ``training_step`` receives, for a probe, and the loaders they are drawn from (None: no loader).

    One loader: :func:`probe_loader` of it. Several (a dict or list of loaders, or a ``CombinedLoader``, given to
    ``fit``): combined as the fit loop combines them, in its mode, so each batch is the dict or list of batches
    ``training_step`` gets. An ``IterableDataset`` is read from a copy (:func:`probe_loader`).

    Raises:
        OneShotLoader: when a training loader is an iterator that yields each batch once (a generator, a stream
            whose ``__iter__`` returns itself) or a stream that cannot be copied: the batches a probe read would
            never reach training.
    """
    loaders = trainer.train_dataloader
    if loaders is None:
        return None
    if not isinstance(loaders, (Mapping, list, tuple)):
        if one_shot(loaders):
            raise OneShotLoader(_ONE_SHOT.format(type(loaders).__name__))
        return probe_loader(loaders), [loaders]
    from lightning.pytorch.utilities.combined_loader import CombinedLoader
    from lightning_utilities.core.apply_func import apply_to_collection

    mode = getattr(getattr(trainer.fit_loop, "_combined_loader", None), "_mode", "max_size_cycle")
    if mode not in ("min_size", "max_size"):
        mode = "max_size_cycle"  # the fit loop's default (and "sequential" does not train)
    for loader in CombinedLoader(loaders).flattened:
        if one_shot(loader):
            raise OneShotLoader(_ONE_SHOT.format(type(loader).__name__))
    combined = CombinedLoader(apply_to_collection(loaders, DataLoader, probe_loader), mode=mode)  # type: ignore[arg-type]

    def batches() -> Iterator[Any]:
        for batch, _, _ in combined:
            yield batch

    return batches(), CombinedLoader(loaders).flattened


_ONE_SHOT = (
    "the training data ({}) is an iterator that yields each batch once, so a probe would take batches from training; "
    "pass a DataLoader or another re-iterable object to fit"
)
_UNCOPYABLE = (
    "the training data is a stream ({}) that cannot be copied for a probe (it holds a socket, a file, a lock or "
    "another object deepcopy refuses, or too many objects), and reading the stream itself could take batches from "
    "training"
)


def probe_batches(trainer: pl.Trainer) -> tuple[Iterable[Any], list[Any]] | str:
    """:func:`training_batches` for a check that probes at the start of the run, or the reason there are none (a
    phrase for its ``not_checked`` finding): an unusual loader must not stop the user's training."""
    try:
        probe = training_batches(trainer)
    except OneShotLoader as err:
        return str(err)
    except Exception as err:
        return f"the training batches could not be read for a probe ({type(err).__name__}: {err})"
    return "there is no training dataloader" if probe is None else probe


def loader_generators(loaders: Iterable[Any]) -> list[torch.Generator]:
    """The ``torch.Generator`` objects a DataLoader and its samplers draw from."""
    generators: list[torch.Generator] = []
    for loader in loaders:
        if not isinstance(loader, DataLoader):
            continue
        candidates = [loader.generator, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)]
        batch_sampler = getattr(loader, "batch_sampler", None)
        if batch_sampler is not None:
            candidates.append(getattr(batch_sampler, "sampler", None))
        for candidate in candidates:
            generator = candidate if isinstance(candidate, torch.Generator) else getattr(candidate, "generator", None)
            if isinstance(generator, torch.Generator) and all(generator is not g for g in generators):
                generators.append(generator)
    return generators


def _random_states(loaders: Iterable[Any]) -> list[tuple[Any, Any]]:
    """The random generators a loader's dataset keeps for itself (a seeded augmentation: ``np.random.default_rng``,
    ``np.random.RandomState``, ``random.Random``, ``torch.Generator``) and their states: a probe's extra
    ``__getitem__`` calls advance them. Found in the dataset's attributes, its transforms and the datasets it wraps
    (``Subset``, ``ConcatDataset``), a few levels deep; large containers are not searched."""
    found: list[tuple[Any, Any]] = []
    seen: set[int] = set()

    def visit(obj: Any, depth: int) -> None:
        if id(obj) in seen or depth > 3:
            return
        seen.add(id(obj))
        state = _generator_state(obj)
        if state is not None:
            found.append((obj, state))
            return
        if isinstance(obj, (list, tuple)) and len(obj) <= 32:
            for item in obj:
                visit(item, depth + 1)
        elif isinstance(obj, dict) and len(obj) <= 32:
            for item in obj.values():
                visit(item, depth + 1)
        elif not isinstance(obj, (torch.Tensor, str, bytes, int, float, bool, type(None))):
            attributes = getattr(obj, "__dict__", None)
            if isinstance(attributes, dict) and len(attributes) <= 64:
                for item in attributes.values():
                    visit(item, depth + 1)

    for loader in loaders:
        dataset = getattr(loader, "dataset", None)
        if dataset is not None:
            visit(dataset, 0)
    return found


def _generator_state(obj: Any) -> Any:
    """A copy of ``obj``'s state when it is a random generator, else None."""
    if isinstance(obj, torch.Generator):
        return obj.get_state()
    if isinstance(obj, random.Random):
        return obj.getstate()
    if isinstance(obj, np.random.Generator):
        return copy.deepcopy(obj.bit_generator.state)
    if isinstance(obj, np.random.RandomState):
        return obj.get_state()
    return None


def _set_generator_state(obj: Any, state: Any) -> None:
    if isinstance(obj, torch.Generator):
        obj.set_state(state)
    elif isinstance(obj, random.Random):
        obj.setstate(state)
    elif isinstance(obj, np.random.Generator):
        obj.bit_generator.state = state
    else:
        obj.set_state(state)


@contextmanager
def muted_logging(pl_module: pl.LightningModule) -> Iterator[None]:
    """Make ``self.log`` / ``self.log_dict`` no-ops: an extra ``training_step`` adds nothing to the user's metrics."""

    def _no_log(*args: Any, **kwargs: Any) -> None:
        return None

    pl_module.log = _no_log  # type: ignore[method-assign]
    pl_module.log_dict = _no_log  # type: ignore[method-assign]
    try:
        yield
    finally:
        del pl_module.log
        del pl_module.log_dict


def on_device(trainer: pl.Trainer, batch: Any) -> Any:
    """``batch`` as ``training_step`` receives it: moved to the device and converted by the precision plugin."""
    return trainer.precision_plugin.convert_input(trainer.strategy.batch_to_device(batch))


def call_training_step(pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> Any:
    """``pl_module.training_step`` on ``batch``, passing ``batch_idx`` only when it takes one (as Lightning does)."""
    if is_param_in_hook_signature(pl_module.training_step, "batch_idx", min_args=2):
        return pl_module.training_step(batch, batch_idx)
    return pl_module.training_step(batch)


_METRIC_ATTRIBUTES = ("_update_count", "_computed", "_forward_cache", "_is_synced", "_cache")


def _metric_states(pl_module: pl.LightningModule) -> list[tuple[Any, dict[str, Any]]]:
    """A copy of the accumulated state of every torchmetrics ``Metric`` in the module (``update`` calls in
    ``training_step`` add to it: an extra step must not count in the user's epoch metrics)."""
    from torchmetrics import Metric

    states = []
    for module in pl_module.modules():
        if isinstance(module, Metric):
            names = [*module._defaults, *(n for n in _METRIC_ATTRIBUTES if n in vars(module))]
            states.append((module, {name: copy.deepcopy(getattr(module, name)) for name in names}))
    return states


@contextmanager
def isolated(
    pl_module: pl.LightningModule,
    train_mode: bool | None,
    loaders: Iterable[Any] = (),
    restore_parameters: bool = False,
) -> Iterator[None]:
    """Evaluate ``pl_module`` under ``torch.no_grad`` with every piece of training state restored afterwards.

    Args:
        pl_module: the module to evaluate.
        train_mode: put every submodule in train mode (True) or eval mode (False) for the evaluation; None: the
            modes training runs in, as they are (Lightning keeps a submodule the user put in eval mode, e.g. a frozen
            teacher, in eval mode; a module that is in eval mode as a whole is put in train mode).
        loaders: DataLoaders whose generators the evaluation may advance (by creating an iterator), and whose
            datasets' own random generators it may advance (by reading examples).
        restore_parameters: also copy every parameter and put it back afterwards, for code that may update
            parameters in place (an EMA teacher updated inside ``training_step``). Costs one transient copy of
            the parameters on their device.
    """
    rng_states = _collect_rng_states(include_cuda=torch.cuda.is_available())
    loaders = list(loaders)
    generator_states = [(g, g.get_state()) for g in loader_generators(loaders)]
    dataset_states = _random_states(loaders)
    training_flags = [(module, module.training) for module in pl_module.modules()]
    tensors = list(pl_module.buffers()) + (list(pl_module.parameters()) if restore_parameters else [])
    buffers = [(tensor, tensor.detach().clone()) for tensor in tensors]
    metrics = _metric_states(pl_module)
    try:
        if train_mode is not None:
            pl_module.train(train_mode)
        elif not pl_module.training:
            pl_module.train(True)
        with torch.no_grad(), muted_logging(pl_module):
            yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for metric, saved_state in metrics:
            for name, value in saved_state.items():
                setattr(metric, name, value)
        for module, flag in training_flags:
            module.training = flag
        for generator, state in generator_states:
            generator.set_state(state)
        for generator, state in dataset_states:
            _set_generator_state(generator, state)
        _set_rng_states(rng_states)
