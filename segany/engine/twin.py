"""Engine twins of a model's modules: the same parameters and buffers under the same names, the
engine's inference code.

Each engine module is a subclass of the plain module in segany.modeling that it serves, registered
here (`register(plain_class, engine_class)`); `twin(model)` walks the model and gives every module
whose class is registered the engine's class. The twin holds the model's own parameter and buffer
dictionaries, so weights loaded, moved or modified in place are what the engine reads; the model
itself is never changed.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Type

import torch
from torch import nn

_ENGINE_CLASSES: Dict[Type[nn.Module], Type[nn.Module]] = {}


def register(plain: Type[nn.Module], engine: Type[nn.Module]) -> None:
    """Serve modules of exactly the class `plain` with `engine` (a subclass with the same attributes)."""
    _ENGINE_CLASSES[plain] = engine


def engine_class(plain: Type[nn.Module]) -> Type[nn.Module]:
    return _ENGINE_CLASSES.get(plain, plain)


def twin(
    module: nn.Module,
    classes: Optional[Mapping[Type[nn.Module], Type[nn.Module]]] = None,
    keep_unchanged: bool = False,
    paths: Optional[Any] = None,
) -> nn.Module:
    """A copy of `module`'s tree whose modules have the engine's classes, sharing its parameters and
    buffers (their dictionaries, not copies). `classes`: plain class -> twin class (default: the
    inference engine's, see register, whose twin is bound to `paths`, segany.engine.paths: by
    default those for the device the module's weights are on). With `keep_unchanged` a subtree
    without any class to change is the model's own module (not a copy), so that its train()/eval()
    state is the model's."""
    made: Dict[int, nn.Module] = {}
    inference = classes is None
    classes = _ENGINE_CLASSES if classes is None else classes

    def changes(m: nn.Module) -> bool:
        return any(type(sub) in classes for sub in m.modules())

    def convert(m: nn.Module) -> nn.Module:
        if id(m) in made:
            return made[id(m)]
        if keep_unchanged and not changes(m):
            made[id(m)] = m
            return m
        new = object.__new__(classes.get(type(m), type(m)))
        new.__dict__ = m.__dict__.copy()
        new._parameters = m._parameters
        new._buffers = m._buffers
        made[id(m)] = new
        new._modules = {name: None if child is None else convert(child) for name, child in m._modules.items()}
        return new

    result = convert(module)
    if inference:
        from .paths import EnginePaths, bind

        bind(result, EnginePaths.build(device_of(module)) if paths is None else paths)
    return result


def device_of(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (the CPU for a module with none)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


class _Unbound:
    """`paths` (segany.engine.paths) of an engine module used on its own, outside an engine (tests,
    tools): chosen for the device its weights are on when read. An engine binds its modules' paths
    once, when it is built (paths.bind), and this is not read then."""

    def __get__(self, module: Optional[nn.Module], owner: type) -> Any:
        if module is None:
            return self
        from .paths import EnginePaths

        return EnginePaths.build(device_of(module))


UNBOUND = _Unbound()


class chosen_at_build:
    """A module's choice of path made from the engine's paths and the module's own weights (their
    dtype, fixed by the mode's precision policy) when an engine binds it (segany.engine.paths.bind),
    and stored on the module then; for a module used on its own, made when read.

        native_upscaling = chosen_at_build(lambda module, paths: paths.native is not None and ...)
    """

    def __init__(self, choose: Callable[[nn.Module, Any], Any]) -> None:
        self.choose = choose
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, module: Optional[nn.Module], owner: type) -> Any:
        if module is None:
            return self
        return self.choose(module, module.paths)


def own_weights_in(module: nn.Module, dtype: torch.dtype) -> None:
    """Give the twin `module` (and its submodules) floating parameters and buffers of its own in `dtype`
    (inference only); those already in `dtype` stay shared with the model."""

    def converted(t: torch.Tensor) -> torch.Tensor:
        if t is None or not t.is_floating_point() or t.dtype == dtype:
            return t
        value = t.detach().to(dtype)
        return nn.Parameter(value, requires_grad=False) if isinstance(t, nn.Parameter) else value

    for m in module.modules():
        m._parameters = {name: converted(p) for name, p in m._parameters.items()}
        m._buffers = {name: converted(b) for name, b in m._buffers.items()}
    from .paths import rebind

    rebind(module)  # the modules that choose by their weights' dtype choose again
