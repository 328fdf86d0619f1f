"""Shared test setup: every test runs with numpy raising on any floating-point error."""

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _raise_on_float_errors():
    old = np.seterr(all="raise")
    yield
    np.seterr(**old)


@pytest.fixture(params=["numpy", "compiled"])
def gate_backend(request):
    """Run the test on the numpy path (the oracle) and on the compiled kernels."""
    from moe import bindings

    if request.param == "compiled" and not bindings.HAVE_COMPILED:
        pytest.skip("the compiled kernels are not built")
    with bindings.use_backend(request.param):
        yield request.param
