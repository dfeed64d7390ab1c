"""What the Newton tests share (test_newton.py, test_cuda_newton.py): SPD systems, the
float64 solution, the tolerance."""
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
