"""Drop-in twins of :mod:`torch.nn.utils.parametrizations`.

:func:`orthogonal`, :func:`spectral_norm` and :func:`weight_norm` take the same arguments and
give the same weights, gradients, ``state_dict`` keys and errors as torch's, and load legacy
``state_dict`` keys. Beyond torch: ``O(n k^2)`` Stiefel maps for tall orthogonal weights, true
inverses for assignment, ``refresh`` of the orthogonal trivialization, and
:func:`weight_norm_init_` (data-dependent initialization).
"""

from __future__ import annotations

from ._orthogonal import orthogonal
from ._spectral_norm import spectral_norm
from ._weight_norm import weight_norm, weight_norm_init_

__all__ = ["orthogonal", "spectral_norm", "weight_norm", "weight_norm_init_"]
