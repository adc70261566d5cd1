"""The aggregation methods and their registry: the one list of method names.

Config validation, `aggregate(method, ...)`, the round loop and the analysis commands look
methods up here. Adding a method = one module with a `Method` subclass (see base.py) and a
`register(...)` of an instance of it: in this package's list below, or from outside the package
(as tests/example_method.py does).
"""

from __future__ import annotations

from florist_mpi.methods import fedex, fedit, ffa, flexlora, flora, florist, hetlora
from florist_mpi.methods.base import Method, contract_breach

_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make `method` known by its name; a name is registered once."""
    if not method.name or not method.name.isidentifier():
        raise ValueError(f"method name {method.name!r} must be a non-empty identifier")
    if method.name in _REGISTRY:
        raise ValueError(f"method '{method.name}' is already registered")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Forget a registered method (for methods registered at run time, e.g. by tests)."""
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    """Every registered method name, built-in ones first, in registration order."""
    return tuple(_REGISTRY)


def get(name: str | Method) -> Method:
    """The method of that name (a Method passes through); ValueError naming the known ones."""
    if isinstance(name, Method):
        return name
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method '{name}': use one of {', '.join(_REGISTRY)}") from None


def check_result(method: Method, result, stack) -> None:
    """A ValueError naming the method when its result breaks the contract of methods/base.py."""
    breach = contract_breach(result, stack, stack.B.dtype)
    if breach is not None:
        raise ValueError(
            f"method '{method.name}' broke the aggregation contract: {breach} (see florist_mpi/methods/base.py)"
        )


for _builtin in (florist.Florist(), fedit.FedIT(), flora.FLoRA(), flexlora.FlexLoRA(), ffa.FFALoRA(), fedex.FedEx(),
                 hetlora.HetLoRA()):
    register(_builtin)

__all__ = ["Method", "check_result", "get", "names", "register", "unregister"]
