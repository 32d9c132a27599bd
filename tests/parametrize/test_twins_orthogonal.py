"""The orthogonal twin against torch.nn.utils.parametrizations.orthogonal, and its extras."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations as tp

from dtriv.parametrize import twins

MAPS = ("matrix_exp", "cayley", "householder")
SHAPES = ((5, 5), (7, 3), (3, 7), (6, 2), (2, 6, 4), (2, 3, 4, 4), (2, 3, 5))
DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)
TOL = {torch.float32: 1e-6, torch.complex64: 1e-6, torch.float64: 1e-12,
       torch.complex128: 1e-12}


class Holder(nn.Module):
    """A module holding one parameter ``weight`` of any shape and dtype."""

    def __init__(self, shape, dtype=torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(shape, dtype=dtype))


def _pair(shape, dtype, seed, **kw):
    """torch's and dtriv's parametrization on the same initial weight and RNG state."""
    out = []
    for fn in (tp.orthogonal, twins.orthogonal):
        torch.manual_seed(seed)
        m = Holder(shape, dtype)
        fn(m, **kw)
        out.append(m)
    return out


def _err(a, b):
    """Max abs error relative to max(1, max |b|)."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


def _skew_tril(X):
    """The part of X that matrix_exp/cayley see: X.tril() without the real part of its diagonal."""
    L = (X.mT if X.size(-2) < X.size(-1) else X).tril()
    d = L.diagonal(dim1=-2, dim2=-1)
    d.sub_(d.real.clone())
    return L


def _loss(W, C):
    return (W.conj() * C).real.sum()


def _perturb_(m_t, m_d, orthogonal_map, seed):
    """Set the parameter of both to the same nontrivial value (householder: keep the diagonal)."""
    g = torch.Generator().manual_seed(seed)
    p_t = m_t.parametrizations.weight.original
    p_d = m_d.parametrizations.weight.original
    P = 0.5 * torch.randn(p_t.shape, dtype=p_t.dtype, generator=g)
    if orthogonal_map == "householder":
        P.diagonal(dim1=-2, dim2=-1).copy_(p_t.diagonal(dim1=-2, dim2=-1))
    with torch.no_grad():
        p_t.copy_(P)
        p_d.copy_(P)


CASES = [(m, d) for m in MAPS for d in DTYPES if not (m == "householder" and d.is_complex)]


@pytest.mark.parametrize("orthogonal_map, dtype", CASES,
                         ids=[f"{m}-{str(d).removeprefix('torch.')}" for m, d in CASES])
def test_parity_with_torch(orthogonal_map, dtype):
    for shape in SHAPES:
        for use_trivialization in (True, False):
            _check_parity(orthogonal_map, shape, dtype, use_trivialization)


def _check_parity(orthogonal_map, shape, dtype, use_trivialization):
    kw = dict(orthogonal_map=orthogonal_map, use_trivialization=use_trivialization)
    m_t, m_d = _pair(shape, dtype, 0, **kw)
    tol = TOL[dtype]
    # identical initial state (including the randn drawn to complete a tall base)
    assert m_t.state_dict().keys() == m_d.state_dict().keys()
    for key, val in m_t.state_dict().items():
        got = m_d.state_dict()[key]
        if key.endswith("original") and orthogonal_map != "householder" and use_trivialization:
            # torch stores -I, dtriv 0: both give the skew part 0 (the identity)
            got, val = _skew_tril(got), _skew_tril(val)
        assert _err(got, val) <= tol, (key, shape, use_trivialization)
    assert _err(m_d.weight, m_t.weight) <= tol
    # a nontrivial parameter: weights and gradients
    _perturb_(m_t, m_d, orthogonal_map, 1)
    C = torch.randn(m_t.weight.shape, dtype=dtype, generator=torch.Generator().manual_seed(2))
    W_t, W_d = m_t.weight, m_d.weight
    assert _err(W_d, W_t) <= tol, (shape, use_trivialization)
    _loss(W_t, C).backward()
    _loss(W_d, C).backward()
    g_t = m_t.parametrizations.weight.original.grad
    g_d = m_d.parametrizations.weight.original.grad
    assert _err(g_d, g_t) <= 10 * tol, (shape, use_trivialization)
    # the result is orthogonal
    Wm = W_d.mT if shape[-2] < shape[-1] else W_d
    eye = torch.eye(Wm.shape[-1], dtype=dtype)
    assert (Wm.mH @ Wm - eye).abs().max() < 100 * tol


@pytest.mark.parametrize("orthogonal_map", MAPS)
def test_state_dicts_load_both_ways(orthogonal_map):
    for shape in [(6, 6), (8, 3), (3, 8)]:
        for use_trivialization in (True, False):
            kw = dict(orthogonal_map=orthogonal_map, use_trivialization=use_trivialization)
            src_t, src_d = _pair(shape, torch.float64, 3, **kw)
            _perturb_(src_t, src_d, orthogonal_map, 4)
            dst_t, dst_d = _pair(shape, torch.float64, 5, **kw)
            assert _err(dst_d.weight, src_t.weight) > 1e-3  # really different before loading
            dst_d.load_state_dict(src_t.state_dict())
            dst_t.load_state_dict(src_d.state_dict())
            assert _err(dst_d.weight, src_t.weight) <= 1e-12
            assert _err(dst_t.weight, src_d.weight) <= 1e-12


def _raised(fn):
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value)


@pytest.mark.parametrize(
    "make, kw",
    [
        (lambda: Holder((5,)), {}),
        (lambda: Holder((4, 4)), {"orthogonal_map": "qr"}),
        (lambda: Holder((4, 4), torch.complex64), {"orthogonal_map": "householder"}),
        (lambda: Holder((4, 4)), {"name": "bias"}),
        (lambda: nn.Linear(3, 3), {"name": "nonexistent"}),
    ],
)
def test_errors_match_torch(make, kw):
    expected = _raised(lambda: tp.orthogonal(make(), **kw))
    got = _raised(lambda: twins.orthogonal(make(), **kw))
    assert got == expected


def test_wrong_shape_assignment_matches_torch():
    m_t, m_d = _pair((4, 4), torch.float32, 0)

    def assign(m):
        m.weight = torch.eye(3)

    assert _raised(lambda: assign(m_d)) == _raised(lambda: assign(m_t))


def _random_orthogonal(n, dtype, seed, batch=()):
    """exp of a skew matrix of moderate norm: no eigenvalue -1, det +1."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(*batch, n, n, dtype=dtype, generator=g)
    return torch.linalg.matrix_exp(0.5 * (X - X.mH))


@pytest.mark.parametrize("orthogonal_map", ["matrix_exp", "cayley"])
def test_assignment_through_true_inverse(orthogonal_map):
    for dtype in DTYPES:
        for batch in [(), (3,)]:
            m = twins.orthogonal(Holder((*batch, 6, 6), dtype), orthogonal_map=orthogonal_map,
                                 use_trivialization=False)
            Q = _random_orthogonal(6, dtype, 7, batch)
            m.weight = Q
            tol = 1e-5 if dtype in (torch.float32, torch.complex64) else 1e-10
            assert _err(m.weight, Q) <= tol, (dtype, batch)
            # the parameter is in the image of X -> X.tril(): assignment is idempotent
            X = m.parametrizations.weight.original
            assert torch.equal(X, X.tril())


def test_assignment_of_non_orthogonal_orthogonalizes_by_qr():
    m = twins.orthogonal(Holder((5, 5), torch.float64), use_trivialization=False)
    g = torch.Generator().manual_seed(0)
    Q = _random_orthogonal(5, torch.float64, 1)
    R = torch.triu(torch.rand(5, 5, dtype=torch.float64, generator=g)) + torch.eye(5)
    m.weight = Q @ R  # QR with diag(R) > 0: the Q factor is Q
    assert _err(m.weight, Q) <= 1e-10


@pytest.mark.parametrize("orthogonal_map", ["matrix_exp", "cayley"])
def test_assignment_of_a_reflection_raises(orthogonal_map):
    # a real orthogonal matrix with det -1 has the eigenvalue -1: neither map reaches it
    m = twins.orthogonal(Holder((4, 4), torch.float64), orthogonal_map=orthogonal_map,
                         use_trivialization=False)
    with pytest.raises(ValueError, match=r"^the assigned weight \(Q below, orthogonalized\) is "
                                         rf"not reached by the {orthogonal_map} map.*: Q: "
                                         r"expected a matrix without eigenvalue -1.*neither the "
                                         r"exponential nor the Cayley map"):
        m.weight = torch.diag(torch.tensor([1.0, 1.0, 1.0, -1.0], dtype=torch.float64))


def test_registration_without_trivialization_keeps_torch_initial_value():
    # at registration, torch keeps the raw weight as the parameter (no inverse is called)
    m_t, m_d = _pair((4, 4), torch.float64, 0, use_trivialization=False)
    assert torch.equal(m_d.parametrizations.weight.original, m_t.parametrizations.weight.original)


def test_tall_matrix_exp_assignment_without_trivialization_not_implemented():
    m = twins.orthogonal(Holder((6, 3)), orthogonal_map="matrix_exp", use_trivialization=False)
    with pytest.raises(NotImplementedError, match="non-square"):
        m.weight = torch.eye(6, 3)


def test_tall_cayley_assignment_through_true_inverse():
    # O(n k^2) inverse of the Stiefel Cayley map: any Q in its image is reached
    for dtype in DTYPES:
        for shape in [(7, 3), (3, 7), (2, 6, 4), (9, 1), (40, 6)]:
            torch.manual_seed(0)
            ref = tp.orthogonal(Holder(shape, dtype), orthogonal_map="cayley",
                                use_trivialization=False)
            with torch.no_grad():
                ref.parametrizations.weight.original.mul_(0.5)
            Q = ref.weight.detach()
            m = twins.orthogonal(Holder(shape, dtype), orthogonal_map="cayley",
                                 use_trivialization=False)
            m.weight = Q
            tol = 1e-5 if dtype in (torch.float32, torch.complex64) else 1e-10
            assert _err(m.weight, Q) <= tol, (dtype, shape)


def test_tall_cayley_assignment_unreachable_raises():
    m = twins.orthogonal(Holder((5, 2), torch.float64), orthogonal_map="cayley",
                         use_trivialization=False)
    Q = torch.eye(5, 2, dtype=torch.float64)
    Q[0, 0] = -1.0  # Q[:k] has the eigenvalue -1
    with pytest.raises(ValueError, match="eigenvalue -1"):
        m.weight = Q


@pytest.mark.parametrize("orthogonal_map", ["matrix_exp", "cayley"])
@pytest.mark.parametrize("n, k", [(40, 6), (9, 5), (30, 1)])
def test_tall_stiefel_map_equals_embedding_float64(orthogonal_map, n, k):
    # the O(n k^2) Stiefel map equals torch's n x n embedding, also for larger parameters
    m_t, m_d = _pair((n, k), torch.float64, 0, orthogonal_map=orthogonal_map,
                     use_trivialization=False)
    with torch.no_grad():
        P = 2.0 * torch.randn(n, k, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        m_t.parametrizations.weight.original.copy_(P)
        m_d.parametrizations.weight.original.copy_(P)
    assert _err(m_d.weight, m_t.weight) <= 1e-12


def _twin(shape, orthogonal_map, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return twins.orthogonal(Holder(shape, dtype), orthogonal_map=orthogonal_map)


@pytest.mark.parametrize("orthogonal_map", MAPS)
@pytest.mark.parametrize("shape", [(5, 5), (7, 3), (3, 7), (2, 6, 4)])
def test_assignment_sets_base_and_identity_parameter(orthogonal_map, shape):
    m = _twin(shape, orthogonal_map)
    X = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    Q = torch.linalg.qr(X.mT if shape[-2] < shape[-1] else X).Q
    Q = Q.mT if shape[-2] < shape[-1] else Q
    m.weight = Q
    param = m.parametrizations.weight.original
    expected = torch.zeros(shape, dtype=torch.float64)
    if orthogonal_map == "householder":
        expected.diagonal(dim1=-2, dim2=-1).fill_(-1.0)
    assert torch.equal(param, expected)
    assert _err(m.weight, Q) <= 1e-12
    base = m.parametrizations.weight[0].base
    n = max(shape[-2:])
    assert base.shape[-2:] == (n, n)


@pytest.mark.parametrize("orthogonal_map", MAPS)
def test_refresh_keeps_weight_and_resets_parameter(orthogonal_map):
    for dtype in (torch.float32, torch.float64, torch.complex64):
        if orthogonal_map == "householder" and dtype.is_complex:
            continue
        for shape in [(5, 5), (7, 3), (3, 7), (2, 6, 4), (2, 4, 4)]:
            _check_refresh(orthogonal_map, shape, dtype)


def _check_refresh(orthogonal_map, shape, dtype):
    m = _twin(shape, orthogonal_map, dtype)
    param = m.parametrizations.weight.original
    triv = m.parametrizations.weight[0]
    identity = param.detach().clone()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        P = 0.5 * torch.randn(shape, dtype=dtype, generator=g)
        P.diagonal(dim1=-2, dim2=-1).copy_(identity.diagonal(dim1=-2, dim2=-1))
        param.copy_(P)
    W = m.weight.detach().clone()
    base_before = triv.base
    triv.refresh()
    tol = 1e-6 if dtype in (torch.float32, torch.complex64) else 1e-12
    assert _err(m.weight, W) <= tol, (shape, dtype)
    assert torch.equal(param, identity)
    assert triv.base is base_before  # in place
    base = triv.base
    eye = torch.eye(base.shape[-1], dtype=dtype)
    assert (base.mH @ base - eye).abs().max() <= 10 * tol


def test_refresh_with_explicit_original_and_tag():
    m = _twin((6, 4), "cayley")
    param = m.parametrizations.weight.original
    triv = m.parametrizations.weight[0]
    assert param._dtriv_trivialization() is triv
    with torch.no_grad():
        param.add_(0.1)
    W = m.weight.detach().clone()
    triv.refresh(param)
    assert _err(m.weight, W) <= 1e-12
    assert torch.equal(param, torch.zeros_like(param))


def test_refresh_reprojects_a_drifted_base():
    m = _twin((5, 5), "matrix_exp")
    triv = m.parametrizations.weight[0]
    with torch.no_grad():
        triv.base.mul_(1 + 1e-4)  # constraint error far above tolerance
    triv.refresh()
    eye = torch.eye(5, dtype=torch.float64)
    assert (triv.base.mT @ triv.base - eye).abs().max() <= 1e-13


def test_refresh_errors():
    m = twins.orthogonal(Holder((4, 4)), use_trivialization=False)
    with pytest.raises(RuntimeError, match="use_trivialization=True"):
        m.parametrizations.weight[0].refresh()
    m = _twin((4, 4), "matrix_exp")
    with pytest.raises(ValueError, match="shape"):
        m.parametrizations.weight[0].refresh(torch.zeros(3, 3, dtype=torch.float64))
    # each argument named, before anything changes (raw AttributeError / matmul dtype errors)
    with pytest.raises(TypeError, match="expected original a torch.Tensor, got str"):
        m.parametrizations.weight[0].refresh("x")
    with pytest.raises(ValueError, match="expected original of the base's dtype"):
        m.parametrizations.weight[0].refresh(torch.zeros(4, 4, dtype=torch.float32))
    with pytest.raises(TypeError, match="floating point or complex tensor. Got torch.int64"):
        m.weight = torch.eye(4, dtype=torch.int64)
    # on top of another parametrization there is no base (torch's read fails there; ours
    # computes the map): refresh says so
    stacked = Holder((4, 4))
    torch.nn.utils.parametrize.register_parametrization(stacked, "weight", nn.Identity())
    twins.orthogonal(stacked, orthogonal_map="cayley")
    with pytest.raises(RuntimeError, match="no base"):
        stacked.parametrizations.weight[1].refresh(torch.zeros(4, 4))


def test_refresh_of_a_deep_copy_acts_on_the_copy():
    m = _twin((5, 3), "matrix_exp")
    with torch.no_grad():
        m.parametrizations.weight.original.normal_()
    c = copy.deepcopy(m)
    W = m.weight.detach().clone()
    c.parametrizations.weight[0].refresh()
    assert _err(c.weight, W) <= 1e-12
    assert not c.parametrizations.weight.original.any()
    assert m.parametrizations.weight.original.any()  # the original model is untouched
    # a parametrization stacked on another one cannot locate its input by itself
    twins.orthogonal(m, orthogonal_map="cayley")
    with pytest.raises(RuntimeError, match="original="):
        m.parametrizations.weight[1].refresh()


def test_training_step_matches_torch():
    # an SGD step through both parametrizations lands on the same weight
    m_t, m_d = _pair((8, 3), torch.float64, 0, orthogonal_map="cayley")
    for m in (m_t, m_d):
        param = m.parametrizations.weight.original
        for _ in range(3):
            param.grad = None
            (m.weight[:2] ** 2).sum().backward()
            with torch.no_grad():
                param -= 0.1 * param.grad
    assert _err(m_d.weight, m_t.weight) <= 1e-12


def test_engine_finds_and_refreshes_the_twin():
    from dtriv.parametrize import refresh, trivializations

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 6))
    twins.orthogonal(model[0], orthogonal_map="cayley")
    twins.orthogonal(model[1], use_trivialization=False)  # static: not a trivialization
    found = list(trivializations(model))
    assert [(m, name) for m, name, _ in found] == [(model[0], "weight")]
    assert found[0][2] is model[0].parametrizations.weight[0]
    with torch.no_grad():
        model[0].parametrizations.weight.original.normal_()
    W = model[0].weight.detach().clone()
    assert refresh(model) == 1
    assert _err(model[0].weight, W) <= 1e-6
    assert not model[0].parametrizations.weight.original.any()


def test_a_hessian_does_not_poison_the_constant_caches():
    # a constant built inside a torch.func transform and kept in a module cache broke the next
    # transform through another map of the same size ("level <= current_level" assertion)
    from torch.func import functional_call, hessian

    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    key = "parametrizations.weight.original"

    def hess(orthogonal_map):
        torch.manual_seed(0)
        m = nn.Linear(4, 4, dtype=torch.float64)
        twins.orthogonal(m, orthogonal_map=orthogonal_map)
        params = {k: v.detach() for k, v in m.named_parameters()}

        def loss(X):
            return (functional_call(m, {**params, key: X}, (x,)) ** 3).sum()

        return hessian(loss)(params[key] + 0.1)

    hess("matrix_exp")
    after = hess("cayley")
    from dtriv.retractions import _expm

    _expm._strict_lower.cache_clear()
    torch.testing.assert_close(after, hess("cayley"))


def test_large_identities_are_not_cached():
    from dtriv.retractions._common import CACHED_CONSTANT_MAX_N, cached_eye

    before = cached_eye.cache_info().currsize
    big = cached_eye(CACHED_CONSTANT_MAX_N + 1, torch.float64, torch.device("cpu"))
    assert torch.equal(big, torch.eye(CACHED_CONSTANT_MAX_N + 1, dtype=torch.float64))
    assert cached_eye.cache_info().currsize == before


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4, 4), (6, 3)])
@pytest.mark.parametrize("orthogonal_map", ["matrix_exp", "cayley", "householder"])
def test_half_precision_read_assign_and_refresh(dtype, shape, orthogonal_map):
    # QR-based steps (assignment, the refresh of a tall base) compute in float32: CPU LAPACK
    # has no half QR (torch's own twin fails there)
    from dtriv.parametrize import refresh

    torch.manual_seed(0)
    m = nn.Linear(shape[1], shape[0])
    twins.orthogonal(m, orthogonal_map=orthogonal_map)
    m = m.to(dtype)
    m.weight.float().sum().backward()
    m.weight = torch.randn(shape).to(dtype)
    refresh(m)
    W = m.weight.float()
    gram = W.mT @ W if shape[0] >= shape[1] else W @ W.mT
    assert m.weight.dtype == dtype
    assert (gram - torch.eye(min(shape))).abs().max().item() < 50 * torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("use_trivialization", [True, False])
@pytest.mark.parametrize("orthogonal_map", ["matrix_exp", "cayley", "householder"])
def test_half_precision_registration_orthogonalizes_the_weight(orthogonal_map,
                                                                use_trivialization, dtype):
    # torch's criterion 10 n eps is 5.0 in bfloat16 at n = 64: the initialization (0.77 from
    # orthogonal) was kept as the base; the criterion is capped at 0.1 (without a base the
    # weight is the map of the initialization, orthogonal either way)
    torch.manual_seed(0)
    m = nn.Linear(64, 64).to(dtype)
    twins.orthogonal(m, orthogonal_map=orthogonal_map, use_trivialization=use_trivialization)
    W = m.weight.detach().double()
    assert m.weight.dtype == dtype
    assert (W.mT @ W - torch.eye(64, dtype=torch.float64)).abs().max() < 50 * torch.finfo(dtype).eps


@pytest.mark.parametrize("orthogonal_map", ["matrix_exp", "cayley"])
def test_jacrev_of_jacrev_matches_torch(orthogonal_map):
    # the Taylor nodes' double backward differentiates its recorded computation with
    # torch.func.vjp under transforms (autograd.grad cannot see the transform's saved input)
    from torch.func import functional_call, jacrev

    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    key = "parametrizations.weight.original"
    hessians = []
    for register in (twins.orthogonal, tp.orthogonal):
        torch.manual_seed(0)
        m = nn.Linear(4, 4, dtype=torch.float64)
        register(m, orthogonal_map=orthogonal_map, use_trivialization=False)
        params = {k: v.detach() for k, v in m.named_parameters()}

        def loss(X, m=m, params=params):
            return (functional_call(m, {**params, key: X}, (x,)) ** 3).sum()

        hessians.append(jacrev(jacrev(loss))(params[key] + 0.1))
    torch.testing.assert_close(hessians[0], hessians[1], rtol=1e-9, atol=1e-9)


def test_a_complex_orthogonal_non_unitary_weight_is_made_unitary():
    """The rotation by the complex angle ``0.5j`` satisfies ``Q^T Q = I`` but not
    ``Q^H Q = I``: it is not unitary, so it is orthogonalized, not kept as the base, and the
    weight is unitary."""
    z = torch.tensor(0.5j, dtype=torch.complex128)
    R = torch.stack([torch.stack([z.cos(), -z.sin()]), torch.stack([z.sin(), z.cos()])])
    eye = torch.eye(2, dtype=torch.complex128)
    assert torch.allclose(R.mT @ R, eye) and not torch.allclose(R.mH @ R, eye)
    lin = nn.Linear(2, 2, dtype=torch.complex128)
    with torch.no_grad():
        lin.weight.copy_(R)
    twins.orthogonal(lin)
    W = lin.weight.detach()
    torch.testing.assert_close(W.mH @ W, eye, atol=1e-12, rtol=0)


def test_an_orthogonal_initial_weight_is_kept_bit_for_bit():
    """An initial weight that is already orthogonal (an exact float64 QR factor) becomes the
    base as it is, bit for bit, and the weight equals torch's (re-orthogonalizing it by QR
    would round it)."""
    g = torch.Generator().manual_seed(7)
    Q = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64)).Q
    weights = []
    for register in (twins.orthogonal, tp.orthogonal):
        lin = nn.Linear(6, 6, dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(Q)
        register(lin)
        assert torch.equal(lin.parametrizations.weight[0].base, Q)
        weights.append(lin.weight.detach())
    assert torch.equal(weights[0], weights[1])
