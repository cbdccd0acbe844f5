"""The algorithm registry: an algorithm is a named pair of pure functions of tensors.

    advantages(rewards, **params) -> advantages
    loss(logprobs, proximal_logprobs, behaviour_logprobs, advantages, mask, ref_logprobs=None, **params)
        -> (scalar loss, stats: dict[str, float])

plus, for actor-critic algorithms (PPO), a third one that trains the critic:

    value_loss(values, old_values, returns, mask, **params) -> (scalar loss, stats)

An algorithm **declares** what it needs; nothing is inferred from parameter names:

- `inputs="group"` (default): the advantage function gets `rewards` per group, shaped (G, n), and may
  also take `lengths` (response lengths, shaped like rewards) and `max_new_tokens` (the generation cap).
  `inputs="token"`: it gets `rewards` and `lengths` shaped (b,), one per row of the padded batch, and
  may take the (b, t) tensors aligned with them (`mask`, `values`, `behaviour_logprobs`,
  `proximal_logprobs`, `ref_logprobs`: `TOKEN_INPUTS`); it may return `(advantages, returns)`. A
  group-level function that takes a per-token input is an error at registration.
- `reference`: False (default), True (always keep a frozen reference model), or the names of the
  hyper-parameters that need one when they are > 0 (`reference=("kl_coef",)`).
- `value_loss`: a critic, trained with this loss (PPO).
- `preference=True`: trained on (chosen, rejected) pairs (DPO).

Hyper-parameters are the functions' keyword parameters (with their defaults, overridden by `defaults`),
typed by their default: `algo: {clip_low: "0.3"}` or an unknown key is a config error.

Register with the call form or as a decorator on the loss:

    register_algorithm("grpo", advantages=grpo_advantages, loss=grpo_loss, reference=("kl_coef",))

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

# Inputs the learner can hand an advantage function besides `rewards` (see the module docstring): the
# per-token ones switch it to one row per sample; the group-level ones are shaped like the rewards.
TOKEN_INPUTS = frozenset({"mask", "values", "behaviour_logprobs", "proximal_logprobs", "ref_logprobs"})
ADVANTAGE_INPUTS = TOKEN_INPUTS | {"lengths", "max_new_tokens"}
# Data arguments of the functions; every other named parameter is a hyper-parameter.
TENSOR_ARGS = frozenset({"rewards", "logprobs", "advantages", "old_values", "returns"}) | ADVANTAGE_INPUTS


class UnknownAlgorithm(KeyError, ValueError):
    """An algorithm name or dotted path that resolves to nothing; the message lists the known names."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Algorithm:
    """A registered algorithm.

    `defaults` holds every hyper-parameter of both functions (keyword defaults read from their
    signatures, overridden by the ones given at registration). `advantages` may be None for
    algorithms that consume preferences rather than scalar rewards (e.g. DPO). `inputs`, `reference`,
    `value_loss` and `preference` are the declarations of the module docstring.
    """

    name: str
    advantages: Callable[..., Any] | None
    loss: Callable[..., Any]
    inputs: str = "group"
    reference: bool | tuple[str, ...] = False
    defaults: dict[str, Any] = field(default_factory=dict)
    value_loss: Callable[..., Any] | None = None
    preference: bool = False

    @property
    def needs_reference(self) -> bool:
        """Whether a reference model is kept whatever the hyper-parameters."""
        return self.reference is True

    @property
    def functions(self) -> tuple[Callable[..., Any], ...]:
        return tuple(f for f in (self.advantages, self.loss, self.value_loss) if f is not None)

    def params(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """Defaults updated with `overrides`, each typed like its default (an int where a float is
        declared becomes a float); a key no function accepts, or a value of the wrong type, raises
        ValueError naming it (`algo.<key>`)."""
        merged = {**self.defaults, **{k: _typed(self.name, k, v, self.defaults.get(k)) for k, v in (overrides or {}).items()}}
        accepted = set().union(*(_hyper_params(f) for f in self.functions))
        if "**" not in accepted:
            unknown = sorted(set(merged) - accepted)
            if unknown:
                raise ValueError(f"algorithm {self.name!r} has no parameter(s) {unknown}; "
                                 f"known: {sorted(accepted)}")
        # A KL coefficient set > 0 on an algorithm that declares no reference model would be ignored
        # without a word (the loss gets ref_logprobs=None): refuse it instead.
        declared = set(self.reference) if isinstance(self.reference, tuple) else set()
        silent = sorted(k for k, v in merged.items() if k.startswith("kl") and k.endswith("coef")
                        and k not in declared and self.reference is not True
                        and isinstance(v, (int, float)) and v > 0)
        if silent:
            raise ValueError(f"algo.{silent[0]} > 0, but algorithm {self.name!r} keeps no reference model: "
                             f"register it with reference=({silent[0]!r},)")
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

    def bind_value(self, params: dict[str, Any] | None = None) -> Callable[..., Any]:
        """The critic's `loss_fn(logprobs=values, mask=, batch=)`: `value_loss` against the batch's
        `values` (the critic's at the start of the step) and `returns`."""
        if self.value_loss is None:
            raise ValueError(f"algorithm {self.name!r} has no critic")
        kwargs = _select(self.value_loss, self.params(params))

        def loss_fn(*, logprobs, mask, batch):
            return self.value_loss(logprobs, batch.values, batch.returns, mask, **kwargs)
        return loss_fn

    @property
    def token_level(self) -> bool:
        """Declared `inputs="token"`: the advantage function gets the padded batch's rows (rewards (b,))."""
        return self.inputs == "token"

    def compute_advantages(self, group_rewards: list[Any], batch: Any = None, params: dict[str, Any] | None = None,
                           *, group_lengths: list[Any] | None = None, max_new_tokens: int | None = None
                           ) -> tuple[Any, Any]:
        """Advantages for a padded batch whose rows are the samples of `group_rewards`, group by group.

        `group_rewards` (and `group_lengths`, response lengths) hold one (n,) tensor per group. An
        advantage function without per-token inputs is called on the (G, n) matrices (once per group
        when sizes differ) and gives (b,) advantages. One with per-token inputs (`token_level`) gets them
        from `batch` (mask = response_mask, values, behaviour/proximal/ref log-probs), and rewards and
        lengths flattened to (b,). Returns (advantages, returns or None).
        """
        import torch

        kwargs = self.advantage_kwargs(params)
        wanted = _data_params(self.advantages)
        signature = inspect.signature(self.advantages).parameters
        lengths = group_lengths if group_lengths is not None else [None] * len(group_rewards)
        inputs: dict[str, Any] = {"max_new_tokens": max_new_tokens}
        if self.token_level:
            inputs.update(rewards=torch.cat(group_rewards), mask=batch.response_mask, values=batch.values,
                          behaviour_logprobs=batch.behaviour_logprobs, ref_logprobs=batch.ref_logprobs,
                          proximal_logprobs=batch.proximal_logprobs,
                          lengths=None if group_lengths is None else torch.cat(group_lengths))
            calls = [inputs]
        elif len({len(r) for r in group_rewards}) == 1:  # the usual case: one (G, n) matrix
            calls = [{**inputs, "rewards": torch.stack(group_rewards),
                      "lengths": None if group_lengths is None else torch.stack(group_lengths)}]
        else:
            calls = [{**inputs, "rewards": r[None], "lengths": None if n is None else n[None]}
                     for r, n in zip(group_rewards, lengths)]
        missing = sorted(k for k in wanted if calls[0].get(k) is None and signature[k].default is signature[k].empty)
        if missing:
            raise ValueError(f"algorithm {self.name!r}: advantages need {missing}, which the learner lacks here")
        outs = [self.advantages(**{k: c[k] for k in wanted if c.get(k) is not None}, **kwargs) for c in calls]
        if self.token_level:  # one call over the padded batch; it may also give the returns
            return outs[0] if isinstance(outs[0], tuple) else (outs[0], None)
        return torch.cat([(o[0] if isinstance(o, tuple) else o).reshape(-1) for o in outs]), None

    def wants_reference(self, params: dict[str, Any] | None = None) -> bool:
        """Whether a reference model must be kept: always for `reference=True`, else when one of the
        hyper-parameters named by `reference` is > 0."""
        if isinstance(self.reference, bool):
            return self.reference
        values = self.params(params)
        return any(float(values.get(k) or 0.0) > 0.0 for k in self.reference)


def _typed(algo: str, key: str, value: Any, default: Any) -> Any:
    """`value` of hyper-parameter `key`, checked against the type of its default (None: any type)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ValueError(f"algo.{key}: {algo} expects {type(default).__name__} (default {default!r}), "
                         f"got {value!r}")
    return value


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


def _data_params(fn: Callable[..., Any] | None) -> set[str]:
    """Names of `fn`'s data (non-hyper-parameter) arguments."""
    if fn is None:
        return set()
    return {name for name in inspect.signature(fn).parameters if name in TENSOR_ARGS}


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
    inputs: str = "group",
    reference: bool | str | tuple[str, ...] = False,
    defaults: dict[str, Any] | None = None,
    value_loss: Callable[..., Any] | None = None,
    preference: bool = False,
    replace: bool = False,
):
    """Register an algorithm under `name`.

    Called with `loss`, registers and returns the `Algorithm`. Called without it, returns a decorator
    that registers the decorated function as the loss and returns that function unchanged.
    A name already taken by different functions raises ValueError unless `replace=True`.
    """
    if loss is None:
        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            register_algorithm(name, advantages, fn, inputs=inputs, reference=reference, defaults=defaults,
                               value_loss=value_loss, preference=preference, replace=replace)
            return fn
        return decorator

    if inputs not in ("group", "token"):
        raise ValueError(f"algorithm {name!r}: inputs must be 'group' or 'token', got {inputs!r}")
    token_args = sorted(_data_params(advantages) & TOKEN_INPUTS)
    if inputs == "group" and token_args:
        raise ValueError(f"algorithm {name!r}: its advantage function takes per-token inputs {token_args}: "
                         "declare inputs='token'")
    names = (reference,) if isinstance(reference, str) else reference
    merged = {**_signature_defaults(advantages), **_signature_defaults(value_loss), **_signature_defaults(loss),
              **(defaults or {})}
    if not isinstance(names, bool):
        names = tuple(names)
        unknown = [k for k in names if k not in merged]
        if unknown:
            raise ValueError(f"algorithm {name!r}: reference={unknown} names no hyper-parameter with a default")
    algo = Algorithm(name=name, advantages=advantages, loss=loss, inputs=inputs, reference=names,
                     defaults=merged, value_loss=value_loss, preference=preference)
    algo.params()  # a default that neither function takes is a typo: fail at registration
    old = _REGISTRY.get(name)
    if (old is not None and not replace
            and not (_same_function(old.loss, loss) and _same_function(old.advantages, advantages)
                     and _same_function(old.value_loss, value_loss))):
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
from flux.algorithms import dapo, dpo, ppo, reinforce, rloo  # noqa: E402,F401
