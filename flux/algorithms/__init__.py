"""The algorithm registry: an algorithm is a named pair of pure functions of tensors.

    advantages(rewards, **params) -> advantages
    loss(logprobs, proximal_logprobs, behaviour_logprobs, advantages, mask, ref_logprobs=None, **params)
        -> (scalar loss, stats: dict[str, float])

Register with the call form or as a decorator on the loss:

    register_algorithm("grpo", advantages=grpo_advantages, loss=grpo_loss, defaults={...})

    @register_algorithm("mine", advantages=my_advantages)
    def my_loss(logprobs, proximal_logprobs, behaviour_logprobs, advantages, mask, ref_logprobs=None,
                *, beta=0.1):
        ...

`get_algorithm` takes a registered name or a dotted path "pkg.mod:obj" (obj an `Algorithm`, or the
name that importing pkg.mod registers), so a user's algorithm needs no change to Flux.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

# Tensor arguments of the two functions; every other named parameter is a hyper-parameter.
TENSOR_ARGS = frozenset({"rewards", "logprobs", "proximal_logprobs", "behaviour_logprobs", "advantages",
                         "mask", "ref_logprobs"})


class UnknownAlgorithm(KeyError, ValueError):
    """An algorithm name or dotted path that resolves to nothing; the message lists the known names."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Algorithm:
    """A registered algorithm.

    `defaults` holds every hyper-parameter of both functions (keyword defaults read from their
    signatures, overridden by the ones given at registration). `advantages` may be None for
    algorithms that consume preferences rather than scalar rewards (e.g. DPO).
    `needs_reference` says the loss always needs reference log-probs; any algorithm with a positive
    `kl_coef` needs them too (see `wants_reference`).
    """

    name: str
    advantages: Callable[..., Any] | None
    loss: Callable[..., Any]
    needs_reference: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)

    def params(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """Defaults updated with `overrides`; a key neither function accepts raises ValueError."""
        merged = {**self.defaults, **(overrides or {})}
        accepted = _hyper_params(self.advantages) | _hyper_params(self.loss)
        if "**" not in accepted:
            unknown = sorted(set(merged) - accepted)
            if unknown:
                raise ValueError(f"algorithm {self.name!r} has no parameter(s) {unknown}; "
                                 f"known: {sorted(accepted)}")
        return merged

    def advantage_kwargs(self, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """The subset of `self.params(params)` that `advantages` takes."""
        return _select(self.advantages, self.params(params))

    def loss_kwargs(self, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """The subset of `self.params(params)` that `loss` takes."""
        return _select(self.loss, self.params(params))

    def bind(self, params: dict[str, Any] | None = None) -> Callable[..., Any]:
        """A `loss_fn(logprobs=, mask=, batch=)` for a learner's `step`: the loss with its hyper-parameters
        fixed, reading proximal/behaviour/reference log-probs and advantages from the (micro-)batch."""
        kwargs = self.loss_kwargs(params)

        def loss_fn(*, logprobs, mask, batch):
            return self.loss(logprobs, batch.proximal_logprobs, batch.behaviour_logprobs, batch.advantages,
                             mask, batch.ref_logprobs, **kwargs)
        return loss_fn

    def wants_reference(self, params: dict[str, Any] | None = None) -> bool:
        """Whether a reference model must be kept: always if `needs_reference`, else when kl_coef > 0."""
        return self.needs_reference or float(self.params(params).get("kl_coef", 0.0) or 0.0) > 0.0


_REGISTRY: dict[str, Algorithm] = {}


def _hyper_params(fn: Callable[..., Any] | None) -> set[str]:
    """Names of `fn`'s non-tensor parameters; "**" when it takes **kwargs."""
    if fn is None:
        return set()
    names = set()
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.VAR_KEYWORD:
            names.add("**")
        elif p.kind is not p.VAR_POSITIONAL and p.name not in TENSOR_ARGS:
            names.add(p.name)
    return names


def _signature_defaults(fn: Callable[..., Any] | None) -> dict[str, Any]:
    if fn is None:
        return {}
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()
            if p.name not in TENSOR_ARGS and p.default is not p.empty
            and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _select(fn: Callable[..., Any] | None, params: dict[str, Any]) -> dict[str, Any]:
    names = _hyper_params(fn)
    if "**" in names:
        return dict(params)
    return {k: v for k, v in params.items() if k in names}


def _same_function(a: Callable[..., Any] | None, b: Callable[..., Any] | None) -> bool:
    # A re-imported module (reload, or the same file imported twice) re-registers equal functions.
    return (a is b) or (a is not None and b is not None and
                        (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__))


def register_algorithm(
    name: str,
    advantages: Callable[..., Any] | None = None,
    loss: Callable[..., Any] | None = None,
    *,
    needs_reference: bool = False,
    defaults: dict[str, Any] | None = None,
    replace: bool = False,
):
    """Register an algorithm under `name`.

    Called with `loss`, registers and returns the `Algorithm`. Called without it, returns a decorator
    that registers the decorated function as the loss and returns that function unchanged.
    A name already taken by different functions raises ValueError unless `replace=True`.
    """
    if loss is None:
        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            register_algorithm(name, advantages, fn, needs_reference=needs_reference, defaults=defaults,
                               replace=replace)
            return fn
        return decorator

    merged = {**_signature_defaults(advantages), **_signature_defaults(loss), **(defaults or {})}
    algo = Algorithm(name=name, advantages=advantages, loss=loss, needs_reference=needs_reference,
                     defaults=merged)
    algo.params()  # a default that neither function takes is a typo: fail at registration
    old = _REGISTRY.get(name)
    if (old is not None and not replace
            and not (_same_function(old.loss, loss) and _same_function(old.advantages, advantages))):
        raise ValueError(f"algorithm {name!r} is already registered (by {old.loss.__module__}); "
                         "pass replace=True to override it")
    _REGISTRY[name] = algo
    return algo


def list_algorithms() -> list[str]:
    """Registered names, sorted."""
    return sorted(_REGISTRY)


def get_algorithm(name: str | Algorithm) -> Algorithm:
    """Resolve a registered name or a dotted path ("pkg.mod:obj" or "pkg.mod.obj") to an `Algorithm`.

    For a dotted path the module is imported; `obj` is either an `Algorithm` attribute of it or the name
    under which importing the module registered one. Raises `UnknownAlgorithm` (a KeyError and a
    ValueError) listing the known names.
    """
    if isinstance(name, Algorithm):
        return name
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name or "." in name:
        mod_name, _, attr = name.partition(":") if ":" in name else name.rpartition(".")
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise UnknownAlgorithm(f"cannot import {mod_name!r} for algorithm {name!r}: {e}; "
                                   f"registered: {', '.join(list_algorithms())}") from e
        obj = getattr(module, attr, None)
        if isinstance(obj, Algorithm):
            return obj
        if attr in _REGISTRY:
            return _REGISTRY[attr]
    raise UnknownAlgorithm(f"unknown algorithm {name!r}; registered: {', '.join(list_algorithms())} "
                           "(or give a dotted path 'pkg.mod:obj')")


# Built-in algorithms register themselves on import.
from flux.algorithms import grpo  # noqa: E402,F401
from flux.algorithms import dapo, reinforce, rloo  # noqa: E402,F401
