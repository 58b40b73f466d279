"""checkpoint.transpose: copying the transposed views a Hugging Face weight's slice is read
through (the C++ kernel, and numpy where it does not apply) gives numpy's own copy bit for
bit, and finds NaN/inf wherever they are. Reference: numpy's np.ascontiguousarray / astype."""

import ml_dtypes
import numpy as np
import pytest

from jaxaccel.checkpoint import transpose

DTYPES = (ml_dtypes.bfloat16, np.float16, np.float32)


@pytest.fixture(params=["kernel", "numpy"])
def copier(request, monkeypatch):
    transpose._build.cache_clear()
    if request.param == "numpy":
        monkeypatch.setenv("JAXACCEL_KERNELS", "0")
    elif transpose._kernel() is None:
        pytest.skip("no C++ compiler: the kernel is not built here")
    yield request.param
    transpose._build.cache_clear()


def _views(dtype) -> dict[str, np.ndarray]:
    """torch.nn.Linear weights [out, in] seen as jaxaccel's [in, out] slices, as the model
    families' weight rules cut them: whole, cut over either dim, heads split (q_proj and
    o_proj); odd sizes leave part tiles at every edge."""
    rng = np.random.default_rng(0)
    heads, head_dim, hidden = 6, 16, 40
    q = rng.standard_normal((heads * head_dim, hidden)).astype(dtype)
    o = rng.standard_normal((hidden, heads * head_dim)).astype(dtype)
    odd = rng.standard_normal((67, 131)).astype(dtype)
    return {"whole": odd.T, "out cut": odd.T[:, 13:50], "in cut": odd.T[5:70],
            "heads out": q.T.reshape(hidden, heads, head_dim)[:, 2:5],
            "heads in": o.T.reshape(heads, head_dim, hidden)[1:4]}


@pytest.mark.parametrize("dtype", DTYPES)
def test_copies_equal_numpy(copier, dtype):
    for name, view in _views(dtype).items():
        dest = np.full(view.shape, 7, dtype)
        assert transpose._transpose_plan(dest, view) is not None, name  # the kernel's case
        assert transpose.copy_finite(dest, view), name
        np.testing.assert_array_equal(dest.view(np.uint8),
                                      np.ascontiguousarray(view).view(np.uint8), err_msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_are_found_anywhere(copier, dtype):
    base = np.random.default_rng(1).standard_normal((67, 131)).astype(dtype)
    # inside a whole tile, in the part tiles of either edge, the last element
    for where, bad in [((3, 5), np.nan), ((66, 20), np.inf), ((20, 130), -np.inf),
                       ((66, 130), np.nan)]:
        weight = base.copy()
        weight[where] = bad
        dest = np.empty((131, 67), dtype)
        assert not transpose.copy_finite(dest, weight.T), (where, bad)
        assert transpose.copy_finite(dest, base.T)


def test_a_cast_on_the_way_is_numpy_and_checked(copier):
    weight = np.random.default_rng(2).standard_normal((40, 24)).astype(np.float32)
    dest = np.empty((24, 40), ml_dtypes.bfloat16)
    assert transpose._transpose_plan(dest, weight.T) is None
    assert transpose.copy_finite(dest, weight.T)
    np.testing.assert_array_equal(dest, weight.T.astype(ml_dtypes.bfloat16))
    weight[1, 2] = 1e5  # beyond float16: inf after the cast
    assert not transpose.copy_finite(np.empty((24, 40), np.float16), weight.T)
