"""The demo's models, forward and backward in NumPy: multinomial logistic regression (with
its exact Hessian, for Newton) and a ReLU MLP (with the distillation loss). The optimizers
only ever see arrays and gradients: every update goes through fastopt."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np


def with_bias(x: np.ndarray) -> np.ndarray:
    """x with a column of ones appended (the bias is the last weight of each class)."""
    return np.hstack([x, np.ones((x.shape[0], 1), dtype=x.dtype)])


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the labels (log-sum-exp, stable)."""
    z = logits - logits.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(y)), y]))


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(logits.argmax(axis=1) == y))


# -- multinomial logistic regression -------------------------------------------------------
# W is (classes, features + 1); the objective is the mean cross-entropy + lam/2 * ||W||^2.


def logreg_loss(w: np.ndarray, x: np.ndarray, y: np.ndarray, lam: float) -> float:
    return cross_entropy(x @ w.T, y) + 0.5 * lam * float(np.sum(w * w))


def logreg_grad(w: np.ndarray, x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    p = softmax(x @ w.T)
    p[np.arange(len(y)), y] -= 1.0
    grad: np.ndarray = p.T @ x / len(y) + lam * w
    return grad


def logreg_hessian(w: np.ndarray, x: np.ndarray, lam: float) -> np.ndarray:
    """The exact Hessian over W flattened row-major (index class * features + feature):
    H[(k,a),(l,b)] = mean_i (p_ik [k=l] - p_ik p_il) x_ia x_ib + lam [k=l][a=b]."""
    n, d = x.shape
    k = w.shape[0]
    p = softmax(x @ w.T)
    px = (p[:, :, None] * x[:, None, :]).reshape(n, k * d)
    h = -(px.T @ px)
    for c in range(k):
        block = slice(c * d, (c + 1) * d)
        h[block, block] += (x * p[:, c : c + 1]).T @ x
    h /= n
    h[np.diag_indices_from(h)] += lam
    return h


# -- MLP --------------------------------------------------------------------------------------
# params = [W1, b1, W2, b2, ...]; W_i is (out, in) as in torch.nn.Linear; ReLU between layers.


def mlp_init(rng: np.random.Generator, sizes: Sequence[int], dtype: type) -> List[np.ndarray]:
    """He-uniform weights (torch.nn.Linear's bound for ReLU nets), zero biases."""
    params: List[np.ndarray] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        bound = np.sqrt(6.0 / fan_in)
        params.append(rng.uniform(-bound, bound, (fan_out, fan_in)).astype(dtype))
        params.append(np.zeros(fan_out, dtype=dtype))
    return params


def mlp_forward(params: Sequence[np.ndarray], x: np.ndarray) -> Tuple[np.ndarray, List[np.ndarray]]:
    """(logits, the input of every layer) -- the latter is what backward needs."""
    inputs = [x]
    h = x
    layers = len(params) // 2
    for i in range(layers):
        h = h @ params[2 * i].T + params[2 * i + 1]
        if i < layers - 1:
            h = np.maximum(h, 0)
            inputs.append(h)
    return h, inputs


def mlp_backward(
    params: Sequence[np.ndarray], inputs: Sequence[np.ndarray], dlogits: np.ndarray
) -> List[np.ndarray]:
    """Gradients of every param given d(loss)/d(logits)."""
    grads: List[np.ndarray] = [np.empty(0)] * len(params)
    delta = dlogits
    for i in reversed(range(len(params) // 2)):
        grads[2 * i] = delta.T @ inputs[i]
        grads[2 * i + 1] = delta.sum(axis=0)
        if i > 0:
            delta = (delta @ params[2 * i]) * (inputs[i] > 0)
    return grads


def ce_dlogits(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """d(mean cross-entropy)/d(logits) = (softmax - onehot) / n."""
    p = softmax(logits)
    p[np.arange(len(y)), y] -= 1.0
    out: np.ndarray = p / len(y)
    return out


def distill_dlogits(
    logits: np.ndarray, teacher_logits: np.ndarray, y: np.ndarray, temperature: float, alpha: float
) -> np.ndarray:
    """Hinton et al.'s distillation loss alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) +
    (1 - alpha) * CE(s, y), differentiated: the T^2 keeps the soft term's gradient scale
    independent of T."""
    soft = softmax(logits / temperature) - softmax(teacher_logits / temperature)
    out: np.ndarray = (alpha * temperature / len(y)) * soft + (1 - alpha) * ce_dlogits(logits, y)
    return out
