r"""Twin of :func:`torch.nn.utils.parametrizations.weight_norm`, and its data-dependent init.

.. math::
    w = g \frac{v}{\|v\|},

the norm taken over every dimension but ``dim`` (over all of them for ``dim=None``), through
``torch._weight_norm`` as torch. Parameters ``original0 = g`` and ``original1 = v``; legacy
``{name}_g`` / ``{name}_v`` keys load. Cost: ``O(numel)`` per access.

:func:`weight_norm_init_` is the data-dependent initialization of Salimans & Kingma (2016):
on a batch, each output unit's pre-activation ``t`` is standardized, ``g <- g / std(t)`` and
``b <- -mean(t) / std(t)``, so that the outputs on that batch have mean 0 and std 1 per unit.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from dtriv.parametrize.cache import install_fast_read

__all__ = ["weight_norm", "weight_norm_init_"]


class _WeightNorm(nn.Module):
    r"""``(g, v) -> g v / ||v||`` (norm over all dims but ``dim``; ``dim=None`` -> all)."""

    def __init__(self, dim: int | None = 0) -> None:
        super().__init__()
        if dim is None:
            dim = -1
        self.dim = dim

    def forward(self, weight_g: Tensor, weight_v: Tensor) -> Tensor:
        return torch._weight_norm(weight_v, weight_g, self.dim)

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """``g = ||weight||`` (all dims but ``dim``), ``v = weight``."""
        return torch.norm_except_dim(weight, 2, self.dim), weight


class _LegacyKeysHook:
    """Load-state-dict pre-hook renaming the legacy keys, as torch's ``weight_norm`` does.

    ``{name}_g -> parametrizations.{name}.original0``, ``{name}_v -> ...original1``.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, state_dict, prefix, local_metadata, strict, missing_keys,
                 unexpected_keys, error_msgs) -> None:
        g_key, v_key = f"{prefix}{self.name}_g", f"{prefix}{self.name}_v"
        if g_key in state_dict and v_key in state_dict:
            new = f"{prefix}parametrizations.{self.name}."
            state_dict[new + "original0"] = state_dict.pop(g_key)
            state_dict[new + "original1"] = state_dict.pop(v_key)


def weight_norm(module: nn.Module, name: str = "weight", dim: int = 0) -> nn.Module:
    r"""Apply weight normalization ``w = g v / ||v||`` to a parameter in the given module.

    Drop-in twin of :func:`torch.nn.utils.parametrizations.weight_norm`: ``original0 = g``
    (shape of ``w`` with size 1 outside ``dim``), ``original1 = v``; the norm is per slice of
    ``dim`` (``dim=None``: over the whole tensor). Legacy ``{name}_g``/``{name}_v`` keys load.

    Args:
        module: containing module.
        name: name of the weight parameter. Default: ``"weight"``.
        dim: dimension kept by the norm. Default: 0.

    Returns:
        The module, with the parametrization registered on ``name``.
    """
    parametrize.register_parametrization(module, name, _WeightNorm(dim), unsafe=True)
    install_fast_read(module, name)  # reads call the parametrization directly (same value)
    module._register_load_state_dict_pre_hook(_LegacyKeysHook(name))
    return module


def _weight_norm_list(module: nn.Module, name: str) -> nn.Module:
    """The parametrization list of ``module.<name>``, checked to be a lone dim-0 weight norm."""
    plist = module.parametrizations[name] if parametrize.is_parametrized(module, name) else None
    if (
        plist is None
        or len(plist) != 1
        or not hasattr(plist, "original0")
        or getattr(plist[0], "dim", None) != 0
    ):
        got = "no parametrization" if plist is None else repr(list(plist))
        raise ValueError(
            f"weight_norm_init_: expected module.{name} parametrized by weight_norm "
            f"(dim=0) alone, got {got}"
        )
    return plist


@torch.no_grad()
def weight_norm_init_(module: nn.Module, inputs: Tensor, *, name: str = "weight",
                      eps: float = 1e-8) -> nn.Module:
    r"""Data-dependent initialization of a weight-normalized layer (Salimans & Kingma, 2016).

    Runs ``module(inputs)``; with ``t = y - b`` the pre-activations (output unit = the last
    dimension for ``Linear``, dimension 1 for ``Conv{1,2,3}d``), ``mu`` and ``sigma`` their mean
    and (population) standard deviation over every other dimension, it sets

    .. math::
        g \leftarrow g / \sigma, \qquad b \leftarrow -\mu / \sigma,

    in place, so that the outputs on ``inputs`` have mean 0 and std 1 per unit (``t`` is
    linear in ``g`` per unit). Without a bias only ``g`` is rescaled. Cost: one forward.

    Args:
        module: ``Linear`` or ``Conv{1,2,3}d`` with ``weight_norm(module, name, dim=0)``.
        inputs: a batch of inputs.
        name: the weight-normalized parameter. Default: ``"weight"``.
        eps: added to ``sigma``. Default: ``1e-8``.

    Returns:
        The module.
    """
    if isinstance(module, nn.Linear):
        unit_dim = -1
    elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        unit_dim = 1
    else:
        raise ValueError(
            "weight_norm_init_: expected module to be nn.Linear or nn.Conv{1,2,3}d, "
            f"got {type(module).__name__}"
        )
    plist = _weight_norm_list(module, name)
    y = module(inputs)
    bias = getattr(module, "bias", None)
    y = y.movedim(unit_dim, -1)
    t = y.reshape(-1, y.size(-1))
    if bias is not None:
        t = t - bias
    mu = t.mean(0)
    sigma = t.std(0, correction=0) + eps
    g = plist.original0
    g.div_(sigma.reshape(g.shape))
    if bias is not None:
        bias.copy_(-mu / sigma)
    return module
