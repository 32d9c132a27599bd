r"""Twin of :func:`torch.nn.utils.parametrizations.orthogonal`.

Same signature, defaults, initial values, random-number consumption, ``state_dict`` keys and
errors as torch's; the weights and their gradients agree to rounding. What it adds:

* Tall weights (``n > k``) with ``"matrix_exp"``/``"cayley"`` never form an ``n x n`` matrix
  for the map. Torch computes ``Q = map(Y - Y^H)[:, :k]`` with ``Y = [X.tril(), 0]`` (``n x n``),
  which costs :math:`O(n^3)`. With ``E = I_{n,k}`` and ``V = (Y - Y^H)[:, :k]
  = L - [L_{:k}^H; 0]`` (``L = X.tril()``) the same matrix is the Stiefel geodesic of the
  canonical metric, :func:`~dtriv.retractions.stiefel.stiefel_exp_canonical` ``(E, V)``, and the
  low-rank Cayley retraction :func:`~dtriv.retractions.stiefel.stiefel_cayley` ``(E, V)``:
  :math:`O(n k^2)` each. With ``use_trivialization=True`` the ``n x n`` ``base`` buffer of torch
  is kept (``state_dict`` compatibility), so the weight ``base @ Q`` costs :math:`O(n^2 k)`.
* Square ``"matrix_exp"`` uses :func:`~dtriv.retractions.lie.expm_of_skew` (``expm(L - L^H)``
  differentiated with respect to ``L``), whose backward costs a small multiple of the forward
  instead of torch's ``2n x 2n`` exponential; square ``"cayley"`` uses
  :func:`~dtriv.retractions.lie.cayley_of_skew`, one autograd node.
* With ``use_trivialization=False`` the square ``"matrix_exp"``/``"cayley"`` maps accept
  assignment ``module.weight = Q`` through their true inverses (principal skew logarithm,
  inverse Cayley map) where torch raises ``NotImplementedError``; so does the tall
  ``"cayley"`` map, by a closed form in :math:`O(n k^2)` (``_stiefel_cayley_preimage``).
  Tall ``"matrix_exp"`` (whose inverse is a Stiefel logarithm) still raises.
* With ``use_trivialization=True`` the parametrization is a dynamic trivialization:
  :meth:`_Orthogonal.refresh` moves the base to the current weight and resets the parameter,
  and the parameter carries ``_dtriv_trivialization`` (a weak reference to the
  parametrization) so that optimizers can find it.

* The weight is computed once per forward by default: the value is memoized
  (:class:`~dtriv.parametrize.ForwardMemo`) until the parameter or the base changes or backward
  consumes its graph, so an RNN reading it at every step costs one map per forward, without
  ``torch.nn.utils.parametrize.cached()``. ``memoize = False`` on the parametrization (or
  :func:`dtriv.parametrize.memoize`) recomputes at every read, as torch does.

* Meta tensors: a model built on ``torch.device("meta")`` registers (``use_trivialization``
  either way, where torch's registration reads the weight's values and fails), evaluates and
  backpropagates with the shapes, dtypes and ``state_dict`` keys it has on a real device; a
  meta weight has no values, so it is neither checked for orthogonality nor orthogonalized.

In half precision (``float16``, ``bfloat16``) a weight counts as orthogonal, and is kept as
it is, only within ``0.1`` of ``Q^H Q = I`` (torch's ``10 n eps`` passes 1 from ``n = 13`` in
bfloat16: torch keeps any initialization as the base, so its "orthogonal" weight is not);
in float32 and float64 the criterion is torch's.

Two conventions differ from torch without changing any weight or gradient: after an
assignment with a base, the ``"matrix_exp"``/``"cayley"`` parameter is 0 (torch: ``-I``,
whose skew part ``X.tril() - X.tril()^H`` is 0 as well); ``"householder"`` takes the column
signs from ``sign(diag(X))`` (torch truncates with ``.int()``; equal on the ``+-1`` diagonals
that both produce, since the diagonal gets no gradient).
"""

from __future__ import annotations

from enum import Enum, auto

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from dtriv.parametrize.cache import (
    ForwardMemo,
    Memoized,
    clear_memos_on_load,
    install_fast_read,
)
from dtriv.parametrize.trivialization import _Link
from dtriv.retractions._common import (
    geqrf,
    is_meta,
    outside_compiled_graphs,
    upcast_half,
    without_any_autocast,
    without_autocast,
)
from dtriv.retractions._lu import lu_factor_ex
from dtriv.retractions.householder import householder, householder_inverse
from dtriv.retractions.lie import cayley_inverse, cayley_of_skew, expm_of_skew, logm
from dtriv.retractions.stiefel import stiefel_cayley, stiefel_exp_canonical

__all__ = ["orthogonal"]


#: the largest tolerance of :func:`_is_orthogonal`: torch's ``10 n eps`` passes 1 in half
#: precision from ``n = 13`` (bfloat16) or ``n = 103`` (float16), where every weight, however
#: far from orthogonal, would be kept as the base (a ``Linear(64, 64)`` initialization in
#: bfloat16 has ``max|Q^T Q - I| = 0.77``); in float32 the cap binds from ``n = 83,887``.
_MAX_ATOL = 0.1


def _is_orthogonal(Q: Tensor) -> bool:
    """``Q^H Q == I`` to ``10 n eps`` (torch's criterion), at most :data:`_MAX_ATOL`; ``True``
    for a meta tensor, which has no values to check (it is then kept as it is, as an
    orthogonal value would be)."""
    if is_meta(Q):
        return True
    n, k = Q.size(-2), Q.size(-1)
    Id = torch.eye(k, dtype=Q.dtype, device=Q.device)
    eps = min(10.0 * n * torch.finfo(Q.dtype).eps, _MAX_ATOL)
    return torch.allclose(Q.mH @ Q, Id, atol=eps)


@upcast_half
def _make_orthogonal(A: Tensor) -> Tensor:
    """Q factor of the QR decomposition ``A = QR`` of a tall ``A`` with ``diag(R) > 0``
    (half precision through float32: CPU LAPACK has no half QR; meta tensors: the shapes)."""
    X, tau = geqrf(A)
    Q = torch.linalg.householder_product(X, tau)
    Q *= X.diagonal(dim1=-2, dim2=-1).sgn().unsqueeze(-2)
    return Q


def _neg_id_like(X: Tensor) -> Tensor:
    """Zeros of the shape of ``X`` with ``-1`` on the diagonal (householder of it is ``I``)."""
    neg_Id = torch.zeros_like(X)
    neg_Id.diagonal(dim1=-2, dim2=-1).fill_(-1.0)
    return neg_Id


def _tril_preimage(A: Tensor) -> Tensor:
    r"""``X`` with ``X.tril() - X.tril()^H = A`` for a skew-Hermitian ``A``.

    ``X = A.tril(-1) + diag(A)/2``: the strictly lower part gives the off-diagonal of ``A``
    (``A`` is skew, so its upper part is ``-A.tril(-1)^H``) and the (imaginary) diagonal
    ``d`` of ``A`` is recovered as ``d/2 - conj(d)/2 = d``.
    """
    return A.tril(-1) + torch.diag_embed(A.diagonal(dim1=-2, dim2=-1) / 2)


def _stiefel_tangent(X: Tensor) -> Tensor:
    r"""``V = (Y - Y^H)[:, :k]`` for ``Y = [L, 0]`` (``n x n``), ``L = X.tril()``, built in
    ``O(n k)``.

    For tall ``X`` (``(..., n, k)``) ``V = L - [L_{:k}^H; 0]``; the rows of ``L`` below the
    ``k``-th are those of ``X``, so only the top ``k x k`` block is restricted (torch's
    out-of-place ``tril`` of the whole tall matrix cost 154 us at (4096, 64), forward and
    backward alike).
    """
    k = X.size(-1)
    top = X[..., :k, :].tril()
    return torch.cat([top - top.mH, X[..., k:, :]], dim=-2)


def _stiefel_cayley_preimage(Q: Tensor) -> Tensor:
    r"""``X`` (tall, ``n x k``) whose Cayley parametrization is ``Q`` (orthonormal columns).

    With ``Q = [Q_1; Q_2]`` (``Q_1`` ``k x k``) and ``M = Q_1 + I``, the skew
    ``Omega = [[S, -B^H], [B, 0]]`` with ``cayley(Omega)[:, :k] = Q`` is
    ``B = 2 Q_2 M^{-1}``, ``S = 2 M^{-H} (Q_1 - Q_1^H) M^{-1}`` (from ``Q - E = Omega (Q + E)/2``,
    ``E = I_{n,k}``; ``S`` is skew for any ``Q`` with ``Q^H Q = I``), and ``X = [tril
    preimage of S; B]``. Requires ``Q_1`` without eigenvalue ``-1``. Cost: :math:`O(n k^2)`.
    """
    k = Q.size(-1)
    Q1, Q2 = Q[..., :k, :], Q[..., k:, :]
    M = Q1 + torch.eye(k, dtype=Q.dtype, device=Q.device)
    LU, pivots, info = lu_factor_ex(M)
    T = torch.linalg.lu_solve(LU, pivots, torch.cat([Q1 - Q1.mH, Q2], dim=-2), left=False)
    S = 2 * torch.linalg.lu_solve(LU, pivots, T[..., :k, :], adjoint=True)
    X = torch.cat([_tril_preimage(S), 2 * T[..., k:, :]], dim=-2)
    if is_meta(X):  # no values to check
        return X
    if info.any() or not torch.isfinite(X).all():
        raise ValueError(
            "Q: the Cayley parametrization of a non-square weight cannot reach Q: its top "
            "k x k block Q[:k] has the eigenvalue -1 (Q[:k] + I is singular)"
        )
    return X


@upcast_half
def _complete_base(base: Tensor, Q: Tensor) -> Tensor:
    r"""An orthogonal ``base @ H`` with ``H`` orthogonal ``n x n`` and ``H[:, :k] = Q``
    (half precision through float32).

    ``H`` is the product of the Householder reflectors of the QR decomposition of ``Q``
    (``n x k``, orthonormal columns, so ``R`` is diagonal with unit-modulus entries), its first
    ``k`` columns multiplied by ``sgn(diag(R))``. It is applied to ``base`` without forming it
    (:func:`torch.ormqr`): :math:`O(n^2 k)`.
    """
    a, tau = geqrf(Q)
    out = torch.ormqr(a, tau, base, left=False)
    k = Q.size(-1)
    out[..., :k] *= a.diagonal(dim1=-2, dim2=-1).sgn().unsqueeze(-2)
    return out


class _OrthMaps(Enum):
    matrix_exp = auto()
    cayley = auto()
    householder = auto()


class _Orthogonal(Memoized):
    r"""Orthogonal/unitary parametrization ``X -> Q`` of a tensor of shape ``(..., n, k)``.

    Wide shapes (``n < k``) are handled on the transpose. On the tall frame (``n >= k``):

    * ``matrix_exp``: ``Q = expm(A)`` (square, ``A = L - L^H``, ``L = X.tril()``), or the
      canonical Stiefel geodesic ``stiefel_exp_canonical(I_{n,k}, L - [L_{:k}^H; 0])`` (tall).
    * ``cayley``: ``Q = (I - A/2)^{-1}(I + A/2)`` (square), or ``stiefel_cayley`` (tall).
    * ``householder``: product of the reflectors ``X.tril(-1)`` (real only), columns
      multiplied by the signs of ``diag(X)``.

    With ``use_trivialization=True`` the result is ``base @ Q`` with an ``n x n`` orthogonal
    buffer ``base``: a dynamic trivialization (see :meth:`refresh`).

    The value is memoized (:class:`~dtriv.parametrize.ForwardMemo`): later reads return it
    until ``X`` or ``base`` changes (optimizer step, :meth:`refresh`, assignment,
    ``load_state_dict``), the grad mode changes or backward consumes its graph;
    ``memoize = False`` recomputes at every read.

    Cost (tall frame, ``n x k``): square ``O(n^3)``; tall ``O(n k^2)`` for the map plus
    ``O(n^2 k)`` for the product with ``base``; householder ``O(n k^2)``; a read that hits the
    memo about a microsecond.
    """

    base: Tensor
    #: whether reads reuse the memoized value; ``False``: recompute at every read (torch's way)
    memoize: bool = True

    def __init__(
        self, weight: Tensor, orthogonal_map: _OrthMaps, *, use_trivialization: bool = True
    ) -> None:
        super().__init__()
        if weight.is_complex() and orthogonal_map == _OrthMaps.householder:
            raise ValueError("The householder parametrization does not support complex tensors.")
        self.shape = weight.shape
        self.orthogonal_map = orthogonal_map
        # While True, ``right_inverse`` behaves as torch's at registration (identity for the
        # matrix_exp/cayley maps without trivialization), so initial values match torch's.
        self._registering = False
        self._owner = _Link()  # the ParametrizationList, re-targeted by deepcopy
        self._memo = ForwardMemo()
        if use_trivialization:
            self.register_buffer("base", None)

    # ------------------------------------------------------------------ maps
    def _map(self, X: Tensor, base: Tensor | None = None) -> Tensor:
        """The map on the tall frame (``X`` is ``(..., n, k)``, ``n >= k``), multiplied from
        the left by ``base`` when one is given."""
        n, k = X.size(-2), X.size(-1)
        if n == k and self.orthogonal_map == _OrthMaps.cayley:
            # base @ cayley(L - L^H), L = X.tril(): one node (one product, the base's included)
            return cayley_of_skew(X, lower=True, left=base)
        if self.orthogonal_map == _OrthMaps.householder:
            Q = householder(X)
        elif n == k:
            Q = expm_of_skew(X, lower=True)  # expm(L - L^H), L = X.tril(): one node
        else:
            V = _stiefel_tangent(X)
            E = torch.eye(n, k, dtype=V.dtype, device=V.device).expand_as(V)
            Q = (stiefel_exp_canonical(E, V) if self.orthogonal_map == _OrthMaps.matrix_exp
                 else stiefel_cayley(E, V))
        return Q if base is None else base @ Q

    @outside_compiled_graphs
    def forward(self, X: Tensor) -> Tensor:
        return self._value(X, self._buffers.get("base"))

    @without_autocast
    def _evaluate(self, X: Tensor) -> Tensor:
        """The weight for the parameter ``X``, without the memo; with autocast off (as
        :meth:`dtriv.parametrize.Trivialization._evaluate`)."""
        transposed = X.size(-2) < X.size(-1)
        if transposed:
            X = X.mT
        # the buffer, not hasattr: a missing attribute raises (and is caught) inside nn.Module
        Q = self._map(X, self._buffers.get("base"))
        if transposed:
            Q = Q.mT
        return Q

    # ------------------------------------------------------------ inverses
    @torch.autograd.no_grad()
    def right_inverse(self, Q: Tensor) -> Tensor:
        """Parameter for the weight ``Q`` (orthogonalized by QR first when it is not).

        With a base: ``base <- Q`` (completed to ``n x n`` with a random normal block
        orthogonalized by QR, as torch) and the parameter that maps to the identity is
        returned. Without: the inverse of the map (householder:
        :func:`~dtriv.retractions.householder.householder_inverse`; square
        matrix_exp/cayley: :func:`~dtriv.retractions.lie.logm` /
        :func:`~dtriv.retractions.lie.cayley_inverse`).
        """
        if Q.shape != self.shape:
            raise ValueError(
                f"Expected a matrix or batch of matrices of shape {self.shape}. "
                f"Got a tensor of shape {Q.shape}."
            )
        if not (Q.is_floating_point() or Q.is_complex()):  # (torch: finfo's TypeError)
            raise TypeError(f"Expected a floating point or complex tensor. Got {Q.dtype}.")
        self._forget()
        Q_init = Q
        n, k = Q.size(-2), Q.size(-1)
        transpose = n < k
        if transpose:
            Q = Q.mT
            n, k = k, n

        if not hasattr(self, "base"):
            if self.orthogonal_map == _OrthMaps.householder:
                A = householder_inverse(Q)  # torch's geqrf route, bit for bit
                return A.mT if transpose else A
            if self._registering:
                raise NotImplementedError(
                    "It is not possible to assign to the matrix exponential "
                    "or the Cayley parametrizations when use_trivialization=False."
                )
            if n != k and self.orthogonal_map == _OrthMaps.matrix_exp:
                raise NotImplementedError(
                    "It is not possible to assign to the matrix exponential parametrization "
                    "when use_trivialization=False on non-square weights (its inverse is the "
                    "Stiefel logarithm); use orthogonal_map='cayley' or use_trivialization=True."
                )
            if not _is_orthogonal(Q):
                Q = _make_orthogonal(Q)
            try:
                if n != k:
                    X = _stiefel_cayley_preimage(Q)
                else:
                    X = _tril_preimage(logm(Q) if self.orthogonal_map == _OrthMaps.matrix_exp
                                       else cayley_inverse(Q))
            except ValueError as e:  # the inverse names its own argument, Q
                name = "matrix_exp" if self.orthogonal_map == _OrthMaps.matrix_exp else "cayley"
                raise ValueError(
                    f"the assigned weight (Q below, orthogonalized) is not reached by the "
                    f"{name} map, through whose inverse use_trivialization=False assigns: {e}"
                ) from e
            return X.mT if transpose else X

        if n == k:
            Q = Q.clone() if _is_orthogonal(Q) else _make_orthogonal(Q)
        else:
            N = torch.randn(*(Q.size()[:-2] + (n, n - k)), dtype=Q.dtype, device=Q.device)
            Q = _make_orthogonal(torch.cat([Q, N], dim=-1))
        self.base = Q
        return self._identity_parameter(Q_init)

    def _identity_parameter(self, like: Tensor) -> Tensor:
        """The parameter value that the map sends to the identity: ``-I`` (householder) or 0."""
        if self.orthogonal_map == _OrthMaps.householder:
            return _neg_id_like(like)
        return torch.zeros_like(like)

    # ------------------------------------------------------------- refresh
    def _find_original(self) -> Tensor:
        plist = self._owner()
        if plist is None or len(plist) != 1 or plist[0] is not self:
            raise RuntimeError(
                "refresh: cannot locate the parameter of this parametrization (it was not "
                "registered alone with dtriv.parametrize.orthogonal); "
                "pass it as refresh(original=module.parametrizations.<name>.original)"
            )
        return plist.original

    @without_any_autocast
    @torch.no_grad()
    def refresh(self, original: Tensor | None = None) -> None:
        r"""Dynamic-trivialization step: ``base <- weight``, ``original <- identity value``.

        Square: ``base <- base @ map(X)``. Tall: ``base <- base @ H`` with ``H`` an ``n x n``
        orthogonal completion of ``map(X)`` (Householder, :math:`O(n^2 k)`), so the weight
        ``base[:, :k]`` is unchanged. The new base is re-orthogonalized by QR when its
        constraint error exceeds ``10 n eps``, so rounding never accumulates. The parameter
        becomes zero (householder: the ``-I`` diagonal). Both updates are in place.
        """
        if not hasattr(self, "base"):
            raise RuntimeError(
                "refresh: only the parametrization with use_trivialization=True has a base"
            )
        if original is None:
            original = self._find_original()
        if self.base is None:  # (registered on top of another parametrization, as in torch)
            raise RuntimeError("refresh: the parametrization has no base (it is not the first "
                               "parametrization of its tensor)")
        if not isinstance(original, Tensor):
            raise TypeError(f"refresh: expected original a torch.Tensor, got "
                            f"{type(original).__name__}")
        if original.shape != self.shape:
            raise ValueError(
                f"refresh: expected original of shape {tuple(self.shape)}, "
                f"got {tuple(original.shape)}"
            )
        if original.dtype != self.base.dtype:
            raise ValueError(f"refresh: expected original of the base's dtype {self.base.dtype}, "
                             f"got {original.dtype}")
        self._forget()
        X = original.mT if original.size(-2) < original.size(-1) else original
        Q = self._map(X)
        if Q.size(-2) == Q.size(-1):
            new_base = self.base @ Q
        else:
            new_base = _complete_base(self.base, Q)
        if not _is_orthogonal(new_base):
            new_base = _make_orthogonal(new_base)
        self.base.copy_(new_base)
        original.copy_(self._identity_parameter(original))


def orthogonal(
    module: nn.Module,
    name: str = "weight",
    orthogonal_map: str | None = None,
    *,
    use_trivialization: bool = True,
) -> nn.Module:
    r"""Apply an orthogonal or unitary parametrization to a matrix or a batch of matrices.

    Drop-in twin of :func:`torch.nn.utils.parametrizations.orthogonal` (same arguments,
    defaults, initial value, ``state_dict`` keys and errors). The weight ``Q`` of shape
    ``(..., m, n)`` satisfies ``Q^H Q = I_n`` if ``m >= n`` and ``Q Q^H = I_m`` otherwise.

    Args:
        module: module on which to register the parametrization.
        name: name of the tensor to make orthogonal. Default: ``"weight"``.
        orthogonal_map: ``"matrix_exp"``, ``"cayley"`` or ``"householder"``. Default:
            ``"matrix_exp"`` if the matrix is square or complex, ``"householder"`` otherwise.
        use_trivialization: keep an orthogonal ``base`` buffer, ``Q = base @ map(X)`` (dynamic
            trivialization; see ``module.parametrizations.<name>[0].refresh``). Default: True.

    Differences from torch: tall ``matrix_exp``/``cayley`` cost ``O(n k^2)`` (Stiefel maps,
    no ``n x n`` embedding); without trivialization, assignment through the true inverse for
    square ``matrix_exp``/``cayley`` and tall ``cayley``; ``refresh`` for the trivialization.

    Returns:
        The module, with the parametrization registered on ``name``.
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"Module '{module}' has no parameter or buffer with name '{name}'")
    if weight.ndim < 2:
        raise ValueError(
            "Expected a matrix or batch of matrices. "
            f"Got a tensor of {weight.ndim} dimensions."
        )
    if orthogonal_map is None:
        orthogonal_map = (
            "matrix_exp"
            if weight.size(-2) == weight.size(-1) or weight.is_complex()
            else "householder"
        )
    orth_enum = getattr(_OrthMaps, orthogonal_map, None)
    if orth_enum is None:
        raise ValueError(
            'orthogonal_map has to be one of "matrix_exp", "cayley", "householder". '
            f"Got: {orthogonal_map}"
        )
    orth = _Orthogonal(weight, orth_enum, use_trivialization=use_trivialization)
    orth._registering = True
    try:
        parametrize.register_parametrization(module, name, orth, unsafe=True)
    finally:
        orth._registering = False
    plist = module.parametrizations[name]
    orth._owner = _Link(plist)
    orth._module = _Link(module)
    if use_trivialization and len(plist) == 1:
        plist.original._dtriv_trivialization = _Link(orth)
    install_fast_read(module, name)  # reads served from the memo (once per forward)
    clear_memos_on_load(module, name)
    return module
