"""Every public map on ``meta`` tensors: forward (and backward where the map is differentiable)
gives the shapes and dtypes of the same call on CPU, without reading a value on the host.

A model built on ``torch.device("meta")`` (shape inference, FLOP counting, deferred
initialisation) runs the maps on tensors without values: ``.item()``, ``bool(t)`` and
``float(t)`` raise there. The maps take their data-independent paths (those of
``torch.jit.trace``, :func:`dtriv.retractions._common.no_host_reads`) and skip their value
checks (:func:`dtriv.retractions._common.is_meta`).
"""

from __future__ import annotations

import inspect

import pytest
import torch

import dtriv.retractions as R
from dtriv.retractions import lie

F32, F64, C64, BF16 = torch.float32, torch.float64, torch.complex64, torch.bfloat16

# ---------------------------------------------------------------------------- inputs


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def _randn(g, *shape, dtype=F64):
    if dtype.is_complex:
        real = torch.empty((), dtype=dtype).real.dtype
        return torch.view_as_complex(torch.randn(*shape, 2, dtype=real, generator=g))
    return torch.randn(*shape, dtype=F64, generator=g).to(dtype)


def _skew(g, *shape, dtype=F64, scale=0.3):
    X = _randn(g, *shape, dtype=F64 if not dtype.is_complex else dtype) * scale
    return (X - X.mH).to(dtype)


def _stiefel(g, *shape, dtype=F64):
    work = dtype if dtype in (F32, F64) or dtype.is_complex else F32
    return torch.linalg.qr(_randn(g, *shape, dtype=work))[0].to(dtype)


def _tangent(g, B, scale=0.3):
    Z = _randn(g, *B.shape, dtype=B.dtype if B.dtype in (F32, F64) or B.dtype.is_complex
               else F32).to(B.dtype) * scale
    return Z - B @ R.sym(B.mH @ Z)


def _unit(g, *shape, dtype=F64):
    x = _randn(g, *shape, dtype=dtype)
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)


def _sphere_tangent(g, x, scale=0.3):
    v = _randn(g, *x.shape, dtype=x.dtype) * scale
    return v - x * (x.conj() * v).real.sum(-1, keepdim=True)


# ---------------------------------------------------------------------------- the cases
# id -> (map, inputs(g, dtype) -> tuple of tensors, keyword arguments, indices of the inputs
# differentiated (empty: forward only), dtypes)
_REAL = (F64, F32)
_ALL = (F64, F32, C64, BF16)


def _qr_pair(g, dtype):
    B = _stiefel(g, 2, 7, 3, dtype=dtype)
    return B, R.stiefel_qr(B, _tangent(g, B))


def _polar_pair(g, dtype):
    B = _stiefel(g, 2, 7, 3, dtype=dtype)
    return B, R.stiefel_polar(B, _tangent(g, B))


def _near_identity(g, n, dtype):
    return torch.linalg.matrix_exp(_skew(g, 2, n, n, dtype=F64 if not dtype.is_complex
                                         else C64)).to(dtype)


CASES = {
    "skew": (R.skew, lambda g, d: (_randn(g, 2, 4, 4, dtype=d),), {}, (0,), _REAL),
    "sym": (R.sym, lambda g, d: (_randn(g, 2, 4, 4, dtype=d),), {}, (0,), _REAL),
    # n = 8 > TORCH_MAX_N: the Taylor path (skew input) and the Padé path (general input)
    "expm-skew": (R.expm, lambda g, d: (_skew(g, 2, 8, 8, dtype=d),), {}, (0,), _ALL),
    "expm-general": (R.expm, lambda g, d: (_randn(g, 2, 8, 8, dtype=d) * 0.3,), {}, (0,),
                     _REAL),
    "expm_of_skew": (lie.expm_of_skew, lambda g, d: (_randn(g, 2, 8, 8, dtype=d),), {}, (0,),
                     _ALL),
    "expm_of_skew-lower": (lie.expm_of_skew, lambda g, d: (_randn(g, 8, 8, dtype=d),),
                           {"lower": True}, (0,), _REAL),
    "logm": (R.logm, lambda g, d: (_near_identity(g, 6, d),), {}, (0,), (F64, F32, C64)),
    # n = 8: one solve; n = 100 > CAYLEY_SOLVE_MAX_N: the factorization (and its info check)
    "cayley": (R.cayley, lambda g, d: (_skew(g, 2, 8, 8, dtype=d),), {}, (0,), _ALL),
    "cayley-large": (R.cayley, lambda g, d: (_skew(g, 100, 100, dtype=d),), {}, (0,), _REAL),
    "cayley_of_skew": (lie.cayley_of_skew, lambda g, d: (_randn(g, 2, 8, 8, dtype=d),), {},
                       (0,), _ALL),
    "cayley_of_skew-left": (
        lambda X, left: lie.cayley_of_skew(X, lower=True, left=left),
        lambda g, d: (_randn(g, 2, 8, 8, dtype=d), _stiefel(g, 2, 8, 8, dtype=d)), {},
        (0, 1), _REAL),
    "cayley_inverse": (R.cayley_inverse, lambda g, d: (_near_identity(g, 6, d),), {}, (0,),
                       (F64, F32, C64)),
    "householder": (R.householder, lambda g, d: (_randn(g, 2, 7, 3, dtype=d),), {}, (0,),
                    (F64, F32, BF16)),
    "householder_inverse": (R.householder_inverse, lambda g, d: (_stiefel(g, 2, 7, 3, dtype=d),),
                            {}, (), (F64, F32, BF16)),
    "polar_factor": (R.polar_factor, lambda g, d: (_randn(g, 2, 7, 3, dtype=d),), {}, (0,),
                     _ALL),
    "special_polar_factor": (R.special_polar_factor, lambda g, d: (_randn(g, 2, 5, 5, dtype=d),),
                             {}, (0,), (F64, F32, BF16)),
    "stiefel_qr_inverse": (R.stiefel_qr_inverse, _qr_pair, {}, (1,), (F64, F32, C64)),
    "stiefel_polar_inverse": (R.stiefel_polar_inverse, _polar_pair, {}, (1,), (F64, F32, C64)),
    "stiefel_polar_newton_schulz-iters": (
        R.stiefel_polar_newton_schulz,
        lambda g, d: (B := _stiefel(g, 2, 7, 3, dtype=d), _tangent(g, B)), {"iters": 4},
        (0, 1), _REAL),
    "sphere_exp": (R.sphere_exp, lambda g, d: (x := _unit(g, 3, 5, dtype=d),
                                               _sphere_tangent(g, x)), {}, (0, 1), _ALL),
    "sphere_exp-one-vector": (R.sphere_exp, lambda g, d: (x := _unit(g, 5, dtype=d),
                                                          _sphere_tangent(g, x)), {}, (0, 1),
                              _REAL),
    "sphere_projective": (R.sphere_projective, lambda g, d: (x := _unit(g, 3, 5, dtype=d),
                                                             _sphere_tangent(g, x)), {},
                          (0, 1), _ALL),
    "sphere_log": (R.sphere_log, lambda g, d: (x := _unit(g, 3, 5, dtype=d),
                                               R.sphere_exp(x, _sphere_tangent(g, x))), {},
                   (0, 1), _REAL),
    "sphere_projective_inverse": (
        R.sphere_projective_inverse,
        lambda g, d: (x := _unit(g, 3, 5, dtype=d), R.sphere_projective(x, _sphere_tangent(g, x))),
        {}, (0, 1), _REAL),
    "power_iteration_init": (R.power_iteration_init, lambda g, d: (_randn(g, 2, 6, 4, dtype=d),),
                             {}, (), _ALL),
    "power_iteration_": (
        lambda W, u, v: (R.power_iteration_(W, u, v, 3), u, v)[1:],
        lambda g, d: (W := _randn(g, 6, 4, dtype=d), *R.power_iteration_init(W)), {}, (),
        _ALL),
    "spectral_norm_estimate": (
        R.spectral_norm_estimate,
        lambda g, d: (W := _randn(g, 6, 4, dtype=d), *R.power_iteration_init(W)), {}, (0,),
        _ALL),
    "clip_singular_values": (R.clip_singular_values, lambda g, d: (_randn(g, 2, 6, 4, dtype=d),),
                             {"upper": 1.0, "lower": 0.5}, (0,), _ALL),
}

# the registered Stiefel retractions, each at tall and square shapes
for _name in R.available("stiefel"):
    for _shape in ((2, 7, 3), (5, 5)):
        CASES[f"stiefel-{_name}-{'x'.join(map(str, _shape))}"] = (
            R.get("stiefel", _name).map,
            lambda g, d, shape=_shape: (B := _stiefel(g, *shape, dtype=d), _tangent(g, B)),
            {}, (0, 1), _ALL)

PARAMS = [
    pytest.param(name, dtype, id=f"{name}-{str(dtype).removeprefix('torch.')}")
    for name, case in CASES.items() for dtype in case[4]
]


# ---------------------------------------------------------------------------- helpers


def _to_meta(t: torch.Tensor, grad: bool) -> torch.Tensor:
    """A meta tensor with the shape, dtype and strides of ``t`` (no values)."""
    m = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
    return m.requires_grad_(grad)


def _outputs(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _loss(outs) -> torch.Tensor:
    parts = [(o.real if o.is_complex() else o).float().sum() for o in outs if o.requires_grad]
    return sum(parts[1:], parts[0])


def _run(fn, inputs, kwargs, diff):
    """``fn(*inputs, **kwargs)``, and the gradients of the inputs ``diff`` when non-empty."""
    outs = _outputs(fn(*inputs, **kwargs))
    grads = ()
    if diff:
        grads = torch.autograd.grad(_loss(outs), [inputs[i] for i in diff], allow_unused=True)
    return outs, grads


def _assert_like(meta: torch.Tensor, cpu: torch.Tensor, what: str) -> None:
    assert meta.device.type == "meta", f"{what}: expected a meta tensor, got {meta.device}"
    assert meta.shape == cpu.shape, f"{what}: shape {tuple(meta.shape)} != CPU {tuple(cpu.shape)}"
    assert meta.dtype == cpu.dtype, f"{what}: dtype {meta.dtype} != CPU {cpu.dtype}"


def check_on_meta(fn, cpu_inputs, kwargs=None, diff=()):
    """Run ``fn`` on CPU and on meta copies of the inputs; outputs and gradients alike."""
    kwargs = kwargs or {}
    cpu = [t.detach().clone().requires_grad_(i in diff) for i, t in enumerate(cpu_inputs)]
    meta = [_to_meta(t, i in diff) for i, t in enumerate(cpu_inputs)]
    cpu_outs, cpu_grads = _run(fn, cpu, kwargs, diff)
    meta_outs, meta_grads = _run(fn, meta, kwargs, diff)
    assert len(meta_outs) == len(cpu_outs)
    for i, (m, c) in enumerate(zip(meta_outs, cpu_outs)):
        _assert_like(m, c, f"output {i}")
    for i, (m, c) in zip(diff, zip(meta_grads, cpu_grads)):
        if c is None:
            assert m is None
        else:
            _assert_like(m, c, f"gradient of input {i}")
    return meta_outs


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name, dtype", PARAMS)
def test_map_runs_on_meta_like_on_cpu(name, dtype):
    fn, make, kwargs, diff, _ = CASES[name]
    check_on_meta(fn, make(_gen(), dtype), kwargs, diff)


@pytest.mark.parametrize("iters", [None, 3])
def test_polar_newton_schulz_on_meta(iters):
    """Without ``iters`` the iteration stops on a host-read criterion: the SVD polar factor (the
    limit) runs instead; with ``iters`` the fixed iteration runs."""
    g = _gen()
    B = _stiefel(g, 2, 9, 4)
    check_on_meta(R.stiefel_polar_newton_schulz, (B, _tangent(g, B)), {"iters": iters}, (0, 1))


@pytest.mark.parametrize(
    "kind", R.KINDS)
def test_every_registered_map_and_inverse_runs_on_meta(kind):
    """A guard for maps registered later: each entry of the registry, and its inverse."""
    g = _gen()
    for name in R.available(kind):
        entry = R.get(kind, name)
        if kind == "lie":
            # householder reads reflectors from a tall matrix; the others a skew matrix
            A = _randn(g, 2, 6, 6) if name == "householder" else _skew(g, 2, 6, 6)
            check_on_meta(entry.map, (A,), diff=(0,))
            point = entry.map(A).detach()
            if entry.inverse is not None:
                check_on_meta(entry.inverse, (point,))
        else:
            if kind == "stiefel":
                B = _stiefel(g, 2, 7, 3)
                V = _tangent(g, B)
            else:
                B = _unit(g, 2, 5)
                V = _sphere_tangent(g, B)
            check_on_meta(entry.map, (B, V), diff=(0, 1))
            if entry.inverse is not None:
                check_on_meta(entry.inverse, (B, entry.map(B, V).detach()))


_NOT_MAPS = {"KINDS", "Entry", "available", "get", "register", "clear_scratch"}


def test_every_public_map_has_a_meta_case():
    """Each function of ``dtriv.retractions.__all__`` is exercised by a case above."""
    covered = {getattr(case[0], "__name__", "") for case in CASES.values()}
    covered |= {R.get(k, n).map.__name__ for k in R.KINDS for n in R.available(k)}
    covered |= {"power_iteration_", "stiefel_polar_newton_schulz"}  # lambda and own test
    public = {n for n in R.__all__ if n not in _NOT_MAPS and inspect.isfunction(getattr(R, n))}
    assert public - covered == set()


def test_under_the_meta_device_context():
    """Inputs made inside ``with torch.device("meta")`` (the maps' own constants follow)."""
    with torch.device("meta"):
        A = torch.randn(3, 8, 8, requires_grad=True)
        B = torch.randn(3, 9, 4)
        V = torch.randn(3, 9, 4, requires_grad=True)
        for Q in (R.expm(A), lie.expm_of_skew(A), R.cayley(A), lie.cayley_of_skew(A, lower=True)):
            assert Q.device.type == "meta" and Q.shape == (3, 8, 8)
            Q.sum().backward()
        assert A.grad.device.type == "meta" and A.grad.shape == A.shape
        for name in R.available("stiefel"):
            Y = R.get("stiefel", name).map(B, V)
            assert Y.device.type == "meta" and Y.shape == B.shape
        assert R.logm(torch.randn(8, 8)).shape == (8, 8)
        assert R.householder_inverse(torch.randn(9, 4)).shape == (9, 4)


def test_the_helpers():
    from dtriv.retractions._common import geqrf, is_meta, no_host_reads

    m = torch.empty(3, 4, device="meta")
    c = torch.zeros(3, 4)
    assert is_meta(m) and not is_meta(c)
    assert no_host_reads(m) and not no_host_reads(c)
    # geqrf: torch has no meta kernel; ours returns LAPACK's shapes and column-major layout
    for shape in ((5, 3), (2, 3, 5), (4, 4)):
        a_cpu, tau_cpu = torch.geqrf(torch.randn(shape, dtype=F64))
        a, tau = geqrf(torch.empty(shape, dtype=F64, device="meta"))
        assert (a.shape, a.stride(), a.dtype) == (a_cpu.shape, a_cpu.stride(), a_cpu.dtype)
        assert (tau.shape, tau.dtype) == (tau_cpu.shape, tau_cpu.dtype)
        assert a.device.type == tau.device.type == "meta"
        a2, tau2 = geqrf(torch.randn(shape, dtype=F64, generator=_gen()))
        a3, tau3 = torch.geqrf(torch.randn(shape, dtype=F64, generator=_gen()))
        assert torch.equal(a2, a3) and torch.equal(tau2, tau3)  # CPU: torch's, unchanged
