"""What only NAdam has: mu_product, the product of its momentum coefficients, which
torch.optim.NAdam keeps per param as state and fastopt's steps take as a hyper-parameter
(computed from the step count where it is not given). NAdam's steps themselves are in
conftest's optimizer table, so every table-driven test (test_parity, test_bad_input,
test_cuda, test_torch_parity...) covers them."""
import numpy as np
import pytest

import fastopt
from fastopt import reference

from conftest import (OPTIMIZERS, assert_close, ft, needs_torch, normal_nonzero, torch,
                      torch_roundtrip)

NADAM = OPTIMIZERS["nadam"]


def torch_products(steps, beta1, momentum_decay, dtype="float32"):
    """torch.optim.NAdam's rule: a 0-d tensor multiplied by mu_t at each step (NumPy's
    scalar multiply of that dtype is the same IEEE operation)."""
    kind = np.dtype(dtype).type
    product, out = kind(1.0), []
    for t in range(1, steps + 1):
        product = kind(product * kind(reference.nadam_mu(t, beta1, momentum_decay)))
        out.append(float(product))
    return out


@pytest.mark.parametrize("beta1,momentum_decay", [(0.9, 4e-3), (0.99, 0.1), (0.5, 0.0),
                                                  (0.0, 4e-3), (0.999, 1e-4)])
def test_mu_product_is_torch_float32_product(beta1, momentum_decay):
    # Counting up one step at a time (the cached path) and jumping to a step (from 1, and
    # back down), with the same bits as the float32 tensor torch multiplies.
    want = torch_products(3000, beta1, momentum_decay)
    got = [reference.nadam_mu_product(t, beta1, momentum_decay) for t in range(1, 3001)]
    assert got == want
    for t in (2999, 1, 1500, 7, 3000):
        assert reference.nadam_mu_product(t, beta1, momentum_decay) == want[t - 1]


def test_mu_product_past_the_warm_up():
    # With a momentum_decay this large mu_t rounds to float32(beta1) within ~20 steps: the
    # rest of the product is taken in chunks of float32 multiplies, with the same bits.
    beta1, decay = 0.99999, 2.0
    want = torch_products(200_000, beta1, decay)
    assert reference.nadam_mu_product(200_000, beta1, decay) == want[-1]
    assert reference.nadam_mu_product(131_073, beta1, decay) == want[131_072]
    assert want[-1] > 0.0  # (the product did not simply reach 0)
    # a step count far past where the product stops changing costs nothing more: 0, or a
    # subnormal that float32(beta1) times rounds back to (4 * 2**-149 for 0.9)
    assert reference.nadam_mu_product(2**62, 0.9, 4e-3) == 0.0
    stuck = reference.nadam_mu_product(2**62, 0.9, 1.0)
    assert stuck == 4 * 2.0**-149 == reference.nadam_mu_product(10**5, 0.9, 1.0)


def test_step_out_of_range_is_refused_first():
    p = np.ones(3, np.float32)
    with pytest.raises(ValueError, match=r"^step: must be in \[1, 2\*\*63\)"):
        fastopt.nadam_(p, p.copy(), np.zeros(3, np.float32), np.zeros(3, np.float32),
                       step=2**63, momentum_decay=1.0)


def test_product_that_reaches_one_is_refused(rng):
    # beta1 that rounds to 1 in float32, with a large momentum_decay: mu_t rounds to 1 and
    # so does the product; 1 - product = 0 would divide by zero (torch raises
    # ZeroDivisionError). Refused naming it, nothing written, on every entry point.
    kw = dict(beta1=0.99999999, momentum_decay=1000.0)
    p = normal_nonzero(rng, (5,)).astype(np.float32)
    before = p.copy()
    with pytest.raises(ValueError, match=r"^mu_product \(computed for step 1\): must be"):
        fastopt.nadam_(p, p.copy(), np.zeros(5, np.float32), np.zeros(5, np.float32), step=1,
                       **kw)
    opt = fastopt.NAdam([p], lr=0.01, **kw)
    with pytest.raises(ValueError, match=r"^mu_product \(computed for step 1\): must be"):
        opt.step([p.copy()])
    assert np.array_equal(p, before) and opt.step_count == 0


def test_given_mu_product_is_used(rng):
    # mu_product=None is the product for unchanged hyper-parameters; a given one replaces it
    # (what a caller whose beta1 changed passes), on the kernel and the reference alike.
    shapes = [(7,), (4097,)]
    params = [normal_nonzero(rng, s).astype(np.float32) for s in shapes]
    grads = [normal_nonzero(rng, s).astype(np.float32) for s in shapes]
    runs = {}
    for given in (None, reference.nadam_mu_product(5, 0.9, 4e-3), 0.25):
        p = [a.copy() for a in params]
        m = [np.full(s, 0.1, np.float32) for s in shapes]
        v = [np.full(s, 0.2, np.float32) for s in shapes]
        fastopt.nadam_(p, grads, m, v, step=5, lr=0.01, mu_product=given)
        ref = [a.astype(np.float64) for a in params]
        for r, g, s in zip(ref, grads, shapes):
            reference.nadam(r, g.astype(np.float64), np.full(s, 0.1), np.full(s, 0.2), step=5,
                            lr=0.01, mu_product=given)
        assert_close(p, ref, np.float32, f"params (mu_product={given})")
        runs[given] = p
    default, same, other = runs.values()
    assert all(np.array_equal(a, b) for a, b in zip(default, same))
    assert not any(np.array_equal(a, b) for a, b in zip(default, other))


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), 2.0])
def test_bad_mu_product_is_refused(bad, rng):
    p = normal_nonzero(rng, (9,)).astype(np.float32)
    before = p.copy()
    with pytest.raises(ValueError, match="^mu_product:"):
        fastopt.nadam_(p, p.copy(), np.zeros(9, np.float32), np.zeros(9, np.float32), step=1,
                       mu_product=bad)
    assert np.array_equal(p, before)


# ---- fastopt.torch.NAdam ------------------------------------------------------------------------



def _pair(seed=0, **kw):
    """torch.optim.NAdam and fastopt.torch.NAdam over copies of the same params."""
    gen = torch.Generator().manual_seed(seed)
    start = [torch.randn(s, generator=gen) for s in [(1,), (33,), (7, 5), (4097,)]]
    theirs = [p.clone().requires_grad_() for p in start]
    ours = [p.clone().requires_grad_() for p in start]
    return (theirs, torch.optim.NAdam(theirs, foreach=False, **kw),
            ours, ft.NAdam(ours, **kw))


def _steps(theirs, topt, ours, fopt, n, gen):
    for _ in range(n):
        for a, b in zip(theirs, ours):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        topt.step()
        fopt.step()


@needs_torch
def test_torch_mu_product_bit_for_bit():
    # state["mu_product"] holds torch's bits at every step, also where the group's beta1
    # and momentum_decay change between steps (the product then is not a function of the
    # step count: it is carried), and across checkpoints both ways.
    gen = torch.Generator().manual_seed(1)
    theirs, topt, ours, fopt = _pair(lr=0.01, betas=(0.95, 0.999), momentum_decay=0.05)
    for t in range(12):
        if t == 5:
            for opt in (topt, fopt):
                opt.param_groups[0]["betas"] = (0.8, 0.999)
                opt.param_groups[0]["momentum_decay"] = 0.2
        if t == 8:
            fopt.load_state_dict(torch_roundtrip(topt.state_dict()))
            topt.load_state_dict(torch_roundtrip(fopt.state_dict()))
        _steps(theirs, topt, ours, fopt, 1, gen)
        for a, b in zip(theirs, ours):
            want, got = topt.state[a]["mu_product"], fopt.state[b]["mu_product"]
            assert got.dtype == want.dtype and got.shape == () and torch.equal(got, want), t
            assert float(fopt.state[b]["step"]) == t + 1
        for a, b in zip(theirs, ours):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@needs_torch
def test_torch_mu_product_edited_or_loaded_is_followed():
    # A mu_product set in place, replaced, or given as a number (an old checkpoint) is the
    # one the next step multiplies and uses, as in torch.optim; params whose products
    # differ are stepped apart.
    gen = torch.Generator().manual_seed(2)
    theirs, topt, ours, fopt = _pair(lr=0.01)
    _steps(theirs, topt, ours, fopt, 2, gen)
    for opt, ps in ((topt, theirs), (fopt, ours)):
        opt.state[ps[0]]["mu_product"].fill_(0.125)
        opt.state[ps[1]]["mu_product"] = torch.tensor(0.25)
    fopt.state[ours[2]]["mu_product"] = 0.5  # a number: taken as a float32 tensor
    topt.state[theirs[2]]["mu_product"] = torch.tensor(0.5)
    _steps(theirs, topt, ours, fopt, 3, gen)
    for a, b in zip(theirs, ours):
        assert torch.equal(fopt.state[b]["mu_product"], topt.state[a]["mu_product"])
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@needs_torch
@pytest.mark.parametrize("bad,error", [(1.5, ValueError), (float("nan"), ValueError),
                                       ("x", TypeError), ("two", TypeError)])
def test_torch_bad_mu_product_is_refused(bad, error):
    gen = torch.Generator().manual_seed(3)
    _, _, ours, fopt = _pair(lr=0.01)
    for p in ours:
        p.grad = torch.randn(p.shape, generator=gen)
    fopt.step()
    fopt.state[ours[3]]["mu_product"] = torch.full((2,), 0.5) if bad == "two" else bad
    before = [p.detach().clone() for p in ours]
    with pytest.raises(error, match=r"state of param_groups\[0\]\['params'\]\[3\]: 'mu_product'"):
        fopt.step()
    assert all(torch.equal(p, b) for p, b in zip(ours, before))


@needs_torch
def test_torch_product_that_reaches_one_is_refused():
    gen = torch.Generator().manual_seed(5)
    _, _, ours, fopt = _pair(lr=0.01, betas=(0.99999999, 0.999), momentum_decay=1000.0)
    for p in ours:
        p.grad = torch.randn(p.shape, generator=gen)
    before = [p.detach().clone() for p in ours]
    with pytest.raises(ValueError, match=r"^param_groups\[0\]: 'mu_product' of step 1: must"):
        fopt.step()
    assert all(torch.equal(p, b) for p, b in zip(ours, before))
    assert all(float(fopt.state[p].get("step", 0)) == 0 for p in ours)


@needs_torch
def test_torch_fresh_state_of_torch_is_taken():
    # torch.optim.NAdam's state before a first step (step 0, mu_product 1.0), set by hand or
    # loaded from a checkpoint taken then, steps as torch steps it.
    gen = torch.Generator().manual_seed(6)
    theirs, topt, ours, fopt = _pair(lr=0.01)
    for opt, ps in ((topt, theirs), (fopt, ours)):
        for p in ps:
            opt.state[p] = {"step": torch.tensor(0.0), "mu_product": torch.tensor(1.0),
                            "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    fopt.load_state_dict(torch_roundtrip(fopt.state_dict()))
    _steps(theirs, topt, ours, fopt, 3, gen)
    for a, b in zip(theirs, ours):
        assert torch.equal(fopt.state[b]["mu_product"], topt.state[a]["mu_product"])
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@needs_torch
def test_torch_skipped_step_leaves_mu_product():
    # A GradScaler step skipped for an inf grad moves neither the step count nor the product.
    gen = torch.Generator().manual_seed(4)
    _, _, ours, fopt = _pair(lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    for t in range(3):
        for p in ours:
            p.grad = torch.randn(p.shape, generator=gen)
        if t == 1:
            ours[0].grad[0] = float("inf")
        before = float(fopt.state[ours[3]]["mu_product"]) if t else 1.0
        scaler.scale(torch.ones(()))  # (as scaler.scale(loss).backward() would)
        scaler.step(fopt)
        scaler.update()
        after = float(fopt.state[ours[3]]["mu_product"])
        assert (after == before) == (t == 1), t
    assert float(fopt.state[ours[3]]["step"]) == 2
    assert float(fopt.state[ours[3]]["mu_product"]) == reference.nadam_mu_product(2, 0.9, 4e-3)
