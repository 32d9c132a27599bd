"""Dynamic trivialization: any torch optimizer plus a change of base every K steps."""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from dtriv.retractions._common import outside_compiled_graphs, without_any_autocast

from ._hooks import clear_grads, hooked_step
from .targets import DtrivTarget, Target, _dtriv_link, _has_base, _owners, find_targets

__all__ = ["DynamicTrivialization", "NonFiniteGradientError"]

_STATE_KEY = "dynamic_trivialization"


#: the packages whose frames a warning of the wrapper skips to name its caller's line
_LIBRARY_DIRS = tuple(os.path.dirname(path) + os.sep for path in (
    os.path.dirname(os.path.abspath(__file__)),  # dtriv/optim: dtriv
    torch.__file__,
))


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning issued by the calling function name the first
    frame outside dtriv and torch: the user's line that called ``step()`` (through torch's
    step hooks, :func:`~dtriv.retractions._common.outside_compiled_graphs` and, under
    ``torch.compile``, dynamo's frames), where a fixed count named a line of either library."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level


class NonFiniteGradientError(FloatingPointError):
    """A gradient (or a parameter after a step) holds NaN or inf; no base was changed."""


def _check_K(K: Any) -> float | int:
    if isinstance(K, bool):
        raise ValueError(f"K: expected a positive integer or math.inf, got {K!r}")
    if isinstance(K, float) and math.isinf(K) and K > 0:
        return math.inf
    if isinstance(K, numbers.Integral) and K >= 1:
        return int(K)
    if isinstance(K, float) and K.is_integer() and K >= 1:
        return int(K)
    raise ValueError(f"K: expected a positive integer or math.inf, got {K!r}")


def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _as_modules(modules: Any) -> list[nn.Module] | None:
    if modules is None:
        return None
    if isinstance(modules, nn.Module):
        return [modules]
    result = list(modules)
    for m in result:
        if not isinstance(m, nn.Module):
            raise ValueError(
                f"modules: expected an nn.Module or an iterable of them, got a {type(m).__name__}"
            )
    return result


class DynamicTrivialization(torch.optim.Optimizer):
    r"""Wrap ``optimizer`` so that it optimises dynamic trivializations.

    A dynamic trivialization (Lezcano-Casado, 2019) writes a constrained weight as
    :math:`W = \phi_B(X)`, a map from the free tensor :math:`X` (the parameter) at a base
    point :math:`B` (a buffer). The wrapper steps ``optimizer`` on :math:`X` and every
    ``K`` steps *refreshes* the base of each trivialization whose parameter the optimizer
    owns: :math:`B \leftarrow \phi_B(X)`, :math:`X \leftarrow \phi_B^{-1}`-preimage of the
    base (zero for dtriv), so the weight is unchanged and the next steps start from the
    identity of the map again.

    * ``K = 1`` is Riemannian gradient descent with the retraction of the map (with SGD,
      :math:`W_{t+1} = R_{W_t}(-\eta\, \mathrm{grad} f(W_t))`);
    * ``K = math.inf`` never refreshes (a static trivialization).

    Args:
        optimizer: any :class:`torch.optim.Optimizer` (SGD, Adam, RMSprop, ...). Its
            ``param_groups`` and ``state`` are the wrapper's: schedulers, ``zero_grad``
            and ``add_param_group`` act on both.
        K: refresh every ``K`` successful steps; a positive integer or ``math.inf``.
        state: what happens to the optimizer state of a refreshed parameter: ``"keep"``
            (default, as in the paper: momenta carry over to the new base) or ``"reset"``
            (the state of that parameter is cleared, as for a fresh parameter).
        reproject_every: every ``M`` refreshes, project the bases onto their manifold
            (polar factor for orthogonal bases, normalisation for spheres), as the expRNN
            reference code does, besides the re-projection on drift that dtriv's
            ``refresh`` already does. ``None`` (default): never.
        nonfinite: ``"raise"`` (default): a NaN or inf gradient raises
            :class:`NonFiniteGradientError` before the optimizer steps, so parameters,
            optimizer state and bases stay at their last good values; ``"skip"``: the step
            is skipped (the counter does not advance; :attr:`skipped_steps` counts them) and
            a warning is issued.
        modules: optional modules (a model or an iterable of modules) in which to look for
            the parametrizations of torch (``orthogonal``) and geotorch that own the
            parameters. Without it they are found once by a scan of the live objects
            (``gc.get_objects()``); dtriv's own trivializations never need it.

    Which parametrizations are refreshed: dtriv's ``Trivialization`` (and its twins),
    ``torch.nn.utils.parametrizations.orthogonal(..., use_trivialization=True)`` and
    geotorch's constraints (``orthogonal``, ``sphere``, ...); see
    :mod:`dtriv.optim.targets`. A wrapper whose optimizer holds none of them warns. A
    parametrization removed with ``remove_parametrizations`` is no longer refreshed; one
    registered again on that tensor (whose parameter torch keeps) is refreshed in its place.
    A dtriv parametrization registered on a weight the optimizer already holds after the
    wrapper was built is refreshed from the next refresh on; torch's and geotorch's are found
    only by the scan at construction (or ``add_param_group``).

    ``state_dict()`` holds the inner optimizer's state and the step and refresh counters,
    so a run resumed with ``load_state_dict`` refreshes at the same steps.

    Cost per step: the inner step, one sum per gradient (the non-finite check; one device
    synchronisation) and, every ``K`` steps, one forward of each trivialization.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        K: float | int = 100,
        state: str = "keep",
        reproject_every: int | None = None,
        nonfinite: str = "raise",
        *,
        modules: nn.Module | Iterable[nn.Module] | None = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(
                f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, DynamicTrivialization):
            raise ValueError("optimizer: expected an optimizer, got a DynamicTrivialization")
        self.K = _check_K(K)
        self.state_mode = _check_choice(state, "state", ("keep", "reset"))
        if reproject_every is not None and (
            isinstance(reproject_every, bool)
            or not isinstance(reproject_every, numbers.Integral)
            or reproject_every < 1
        ):
            raise ValueError(
                f"reproject_every: expected None or a positive integer, got {reproject_every!r}"
            )
        self.reproject_every = None if reproject_every is None else int(reproject_every)
        self.nonfinite = _check_choice(nonfinite, "nonfinite", ("raise", "skip"))
        for i, group in enumerate(optimizer.param_groups):
            lr = group.get("lr", 0.0)
            if isinstance(lr, (int, float)) and not lr >= 0:
                raise ValueError(
                    f"lr: expected non-negative learning rates, got {lr} in "
                    f"optimizer.param_groups[{i}]"
                )
        self.optimizer = optimizer
        self._modules_hint = _as_modules(modules)
        #: successful steps taken (the refresh clock)
        self.steps = 0
        #: refreshes done (the re-projection clock)
        self.refreshes = 0
        #: steps skipped because of non-finite gradients (``nonfinite="skip"``)
        self.skipped_steps = 0
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self._targets: list[Target] | None = None
        self._scan(warn=True)

    # ------------------------------------------------------------ Optimizer surface
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The inner optimizer's parameter groups (shared, not copied)."""
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        """The inner optimizer's per-parameter state (shared, not copied)."""
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_targets"] = None  # weak references; found again after unpickling
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._patch_step_function()

    def __repr__(self) -> str:
        K = "inf" if self.K == math.inf else self.K
        inner = repr(self.optimizer).replace("\n", "\n    ")
        return (
            f"DynamicTrivialization(K={K}, state={self.state_mode!r}, "
            f"reproject_every={self.reproject_every}, nonfinite={self.nonfinite!r}, "
            f"targets={len(self.targets)}) wrapping\n    {inner}"
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients of the inner optimizer's parameters: its ``zero_grad``, or
        where that is torch's own, its default case without the profiler range while no
        profiler records (:func:`~dtriv.optim._hooks.clear_grads`)."""
        inner = self.optimizer
        if type(inner).zero_grad is not torch.optim.Optimizer.zero_grad or not clear_grads(
                inner, set_to_none):
            inner.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer and look for trivializations in it.

        With ``modules`` given to the constructor, the group's parameters that no
        parametrization of those modules owns are looked for among all of them (a scan of
        the live objects, once per added group): a module added later is refreshed too.
        """
        self.optimizer.add_param_group(param_group)
        if self._modules_hint is not None:
            new = [p for p in self.optimizer.param_groups[-1]["params"]
                   if _dtriv_link(p) is None]
            known = _owners(new, self._modules_hint)
            missed = [p for p in new if id(p) not in known]
            if missed:  # the modules that own them join the hint
                self._modules_hint.extend(owner[0] for owner in _owners(missed, None).values())
        self._scan(warn=False)

    # ------------------------------------------------------------ targets
    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _scan(self, warn: bool) -> None:
        params = self._params()
        targets, without_base = find_targets(params, self._modules_hint)
        self._targets = targets
        if warn and not targets:
            warnings.warn(
                "DynamicTrivialization: optimizer: expected parameters of dynamic "
                "trivializations (dtriv constrain/Trivialization, torch orthogonal with "
                "use_trivialization=True, geotorch constraints), got none among its "
                f"{len(params)} parameters ({without_base} parametrized without a base); "
                "the wrapper will step the optimizer without refreshing anything",
                UserWarning,
                stacklevel=_caller_stacklevel(),
            )

    @property
    def targets(self) -> list[Target]:
        """The refreshable parametrizations of the optimizer's parameters, in group order."""
        if self._targets is None:
            self._scan(warn=False)
        assert self._targets is not None
        return self._targets

    # ------------------------------------------------------------ stepping
    def _grads(self) -> list[tuple[int, int, Tensor]]:
        return [
            (i, j, p.grad)
            for i, group in enumerate(self.param_groups)
            for j, p in enumerate(group["params"])
            if p.grad is not None
        ]

    @staticmethod
    def _finite(tensors: list[Tensor]) -> list[bool]:
        """Per tensor: whether all entries are finite.

        One sum per tensor and one synchronisation per device and dtype: a NaN or an
        infinity makes the sum non-finite. A non-finite sum of finite entries (overflow) is
        told apart by an exact ``isfinite`` check of that tensor only. (A max-abs reduction
        or ``isfinite().all()`` costs several Adam steps on CPU; a sum costs a tenth of one;
        ``torch._foreach_norm`` five times a sum at 512 x 512.) The sums of one dtype are
        stacked as they are (a conversion to one dtype cost a third of the check).
        """
        flags = [True] * len(tensors)
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        dense = []
        for i, t in enumerate(tensors):
            t = t.coalesce().values() if t.is_sparse else t
            t = torch.view_as_real(t) if t.is_complex() else t
            dense.append(t)
            if t.numel() > 0:
                groups.setdefault((t.device, t.dtype), []).append(i)
        for indices in groups.values():
            sums = torch.stack([dense[i].sum() for i in indices])
            ok = sums.isfinite().tolist()
            for i, v in zip(indices, ok):
                flags[i] = v or bool(torch.isfinite(dense[i]).all())
        return flags

    # Under torch.compile the checks of values and the refresh run as eager code (host reads
    # and in-place writes of the bases, at most every K steps: traced, each refresh added
    # graphs); the inner optimizer's step is still traced.
    @outside_compiled_graphs
    def _gradients_finite(self) -> bool:
        grads = self._grads()
        flags = self._finite([g for _, _, g in grads])
        bad = [(i, j, g) for (i, j, g), ok in zip(grads, flags) if not ok]
        if not bad:
            return True
        where = ", ".join(
            f"param_groups[{i}]['params'][{j}] (shape {tuple(g.shape)})" for i, j, g in bad[:5]
        )
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        if self.nonfinite == "raise":
            raise NonFiniteGradientError(
                f"non-finite gradient (NaN or inf) in {where}{more} at step {self.steps + 1}; "
                "the optimizer did not step, so parameters, optimizer state and bases are at "
                "their last good values. Use DynamicTrivialization(..., nonfinite='skip') to "
                "skip such steps"
            )
        self.skipped_steps += 1
        warnings.warn(
            f"DynamicTrivialization: skipped a step with a non-finite gradient in {where}{more}",
            RuntimeWarning,
            stacklevel=_caller_stacklevel(),
        )
        return False

    step = hooked_step("_step", """``step(closure=None)``: step the inner optimizer, then
        refresh the bases if ``K`` steps have passed.

        With a ``closure``, it is evaluated first (under grad mode) and the gradients it
        produces are checked before the inner optimizer updates anything; optimizers that
        re-evaluate it (LBFGS) get the first loss back on their first call.

        The step hooks and the profiler range ``Optimizer.step#<class>.step`` are torch's,
        run here rather than by torch's wrapper of optimizer classes, which opens the range
        at every step (:mod:`dtriv.optim._hooks`).""")

    def _step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        inner_closure = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            first = [True]

            def inner_closure():
                if first[0]:
                    first[0] = False
                    return loss
                with torch.enable_grad():
                    return closure()

        if not self._gradients_finite():
            return loss
        if inner_closure is not None:
            result = self.optimizer.step(inner_closure)
            loss = result if result is not None else loss
        else:
            self.optimizer.step()
        self.steps += 1
        if self.K != math.inf and self.steps % self.K == 0:
            self.refresh()
        return loss

    @outside_compiled_graphs
    @without_any_autocast
    @torch.no_grad()
    def refresh(self) -> None:
        """Refresh every base now (the wrapper calls this every ``K`` steps).

        Checks first that the parameters are finite (``NonFiniteGradientError`` otherwise,
        with every base untouched); clears the optimizer state of the refreshed parameters
        with ``state="reset"``; re-projects the bases every ``reproject_every`` refreshes.
        """
        targets = self.targets
        removed = [t.original for t in targets if not t.attached()]
        if removed:  # remove_parametrizations since the scan
            targets = self._retarget(targets, removed)
        targets = self._adopt(targets)
        if not targets:
            return
        flags = self._finite([t.original for t in targets])
        bad = [t for t, ok in zip(targets, flags) if not ok]
        if bad:
            names = ", ".join(t.describe() for t in bad[:5])
            raise NonFiniteGradientError(
                f"non-finite parameter values (NaN or inf) after step {self.steps} in {names}; "
                "the bases were not refreshed and hold their last refreshed points"
            )
        count = self.refreshes
        for index, target in enumerate(targets):
            target.refresh(index, count)
        self.refreshes += 1
        if self.reproject_every is not None and self.refreshes % self.reproject_every == 0:
            for target in targets:
                target.reproject()
        if self.state_mode == "reset":
            for target in targets:
                self.optimizer.state.pop(target.original, None)

    def _adopt(self, targets: list[Target]) -> list[Target]:
        """The targets, with dtriv's dynamic trivializations registered on the optimizer's
        parameters since the scan (``constrain`` or the ``orthogonal`` twin applied to a
        weight the optimizer already held: torch keeps the parameter as ``original``).

        Their parameters carry a link to the trivialization, so finding them costs one
        attribute read per parameter at each refresh (a rescan only when one is found).
        Torch's and geotorch's parametrizations registered after the wrapper was built are
        not found this way: build the wrapper after registering them.
        """
        known = {id(t.original) for t in targets}
        for p in self._params():
            if id(p) in known:
                continue
            triv = _dtriv_link(p)
            if triv is not None and _has_base(triv) and DtrivTarget(p, triv).attached():
                self._scan(warn=False)  # in group order
                return self.targets
        return targets

    def _retarget(self, targets: list[Target], removed: list[Tensor]) -> list[Target]:
        """The targets once those of the parameters ``removed`` were removed
        (``remove_parametrizations``).

        A removed parametrization is not refreshed (its parameter is a plain weight, which a
        refresh would overwrite). Torch keeps the parameter object through the removal and
        makes it the ``original`` of a parametrization registered again on the tensor (so the
        optimizer still holds it): that new parametrization, when it has a base, replaces
        the removed one. Looks up the removed targets' parameters only (a scan of the live
        objects, without ``modules``, for those that are not dtriv's).
        """
        # each removed target: its replacement, or None (dropped)
        replaced: dict[int, Target | None] = dict.fromkeys(map(id, removed))
        replaced.update((id(t.original), t) for t in find_targets(removed, self._modules_hint)[0])
        self._targets = [
            kept for kept in (replaced.get(id(t.original), t) for t in targets) if kept is not None
        ]
        return self._targets

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus the wrapper's counters and options (the
        hooks registered on the wrapper with ``register_state_dict_pre_hook`` and
        ``register_state_dict_post_hook`` run as torch's optimizers run them)."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        inner = self.optimizer.state_dict()
        state = dict(inner)
        state[_STATE_KEY] = {
            "steps": self.steps,
            "refreshes": self.refreshes,
            "skipped_steps": self.skipped_steps,
            "K": self.K,
            "state": self.state_mode,
            "reproject_every": self.reproject_every,
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state)
            if result is not None:
                state = result
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by :meth:`state_dict` (or a plain optimizer's one).

        The counters are restored, so the resumed run refreshes at the same steps; the
        options (``K``, ``state``, ``reproject_every``) keep the values given to the
        constructor. The load hooks registered on the wrapper run as torch's optimizers run
        them (a pre-hook may return a replacement state dict).
        """
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        state_dict = dict(state_dict)
        ours = state_dict.pop(_STATE_KEY, None)
        self.optimizer.load_state_dict(state_dict)
        if ours is not None:
            self.steps = int(ours["steps"])
            self.refreshes = int(ours["refreshes"])
            self.skipped_steps = int(ours.get("skipped_steps", 0))
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)
