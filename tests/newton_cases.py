"""What the Newton tests share (test_newton.py, test_cuda_newton.py): SPD and failing
systems, the float64 solution and step, the tolerance, the arrays of the bad-input tables."""
import types

import numpy as np

TOL = {np.float32: 2e-4, np.float64: 1e-10}


def spd(rng, batch_shape, n, dtype, cond_floor=0.5):
    A = rng.standard_normal(batch_shape + (n, n))
    H = A @ np.swapaxes(A, -1, -2) / n + cond_floor * np.eye(n)
    return H.astype(dtype)


def solve64(H, g, damping=0.0):
    n = g.shape[-1]
    return np.linalg.solve(H.astype(np.float64) + damping * np.eye(n),
                           g.astype(np.float64)[..., None])[..., 0]


def assert_close(got, want, dtype):
    scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype] * scale)


def system(rng, batch_shape, n, dtype):
    """A random SPD system and params: (H, g, p)."""
    H = spd(rng, tuple(batch_shape), n, dtype)
    g = rng.standard_normal(tuple(batch_shape) + (n,)).astype(dtype)
    p = rng.standard_normal(tuple(batch_shape) + (n,)).astype(dtype)
    return H, g, p


def newton64(p, g, H, lr=1.0, damping=0.0):
    """The float64 step of every system: p - lr * (H + damping I)^-1 g."""
    return p.astype(np.float64) - lr * solve64(H, g, damping)


# Of a batch of 8 systems (or fewer: those that exist), the flat indices 1 (indefinite:
# H - 5I), 4 (a negative diagonal entry) and 6 (all NaN) are not positive definite.
FAILING = (1, 4, 6)


def failing_system(rng, batch_shape, n, dtype):
    """(H, g, p, the batch indices of the failing systems) with FAILING's systems broken."""
    H, g, p = system(rng, batch_shape, n, dtype)
    flat = H.reshape(-1, n, n)  # a view: H is contiguous
    size = flat.shape[0]
    flat[1] -= 5 * np.eye(n, dtype=dtype)
    flat[4, 3, 3] = -1.0
    if size > 6:
        flat[6] = np.nan
    want = [tuple(int(i) for i in np.unravel_index(k, batch_shape)) for k in FAILING if k < size]
    return H, g, p, want


def bad_input_arrays(backend, rng) -> types.SimpleNamespace:
    """The arrays of the bad-input tables (test_newton, test_cuda_newton; 5 systems of n =
    4): contiguous allocations of ``backend`` (the cases take views of them), and on a GPU
    backend host arrays of the library's CPU kind."""
    H, g, p = system(rng, (5,), 4, np.float64)
    put = backend.asarray
    arrays = types.SimpleNamespace(
        H=put(H), g=put(g), p=put(p),
        H32=put(H.astype(np.float32)), g32=put(g.astype(np.float32)),
        p32=put(p.astype(np.float32)), p16=put(p.astype(np.float16)),
        p_i32=put(rng.integers(-5, 5, (5, 4)).astype(np.int32)),
        p_i64=put(rng.integers(-5, 5, (5, 4)).astype(np.int64)),
        H_wide=put(np.repeat(H, 2, axis=-1)), g_wide=put(np.repeat(g, 2, axis=-1)),
        p_wide=put(np.repeat(p, 2, axis=-1)),
    )
    if backend.is_cuda:
        host = backend.lib.host_array
        arrays.H_host, arrays.g_host, arrays.p_host = host(H), host(g), host(p)
    return arrays
