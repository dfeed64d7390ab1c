"""What only ASGD has: eta and mu, its step size and averaging weight, which
torch.optim.ASGD keeps per param as state and sets after each step, and which fastopt's
steps take as hyper-parameters (computed from the step count where they are not given).
ASGD's steps themselves are in conftest's optimizer table, so every table-driven test
(test_parity, test_bad_input, test_cuda, test_torch_parity...) covers them."""
import numpy as np
import pytest

import fastopt
from fastopt import reference

from conftest import assert_close, ft, needs_torch, normal_nonzero, torch, torch_roundtrip


@pytest.mark.parametrize("t", [1, 2, 3, 7, 1000])
def test_given_eta_and_mu_are_used(t, rng):
    # None is what the step would take for unchanged hyper-parameters; given values replace
    # them, on the kernel and the reference alike; mu = 1 copies the params into ax.
    shapes = [(7,), (4097,)]
    params = [normal_nonzero(rng, s).astype(np.float32) for s in shapes]
    grads = [normal_nonzero(rng, s).astype(np.float32) for s in shapes]
    axs = [normal_nonzero(rng, s).astype(np.float32) for s in shapes]
    kw = dict(lr=0.05, lambd=0.01, alpha=0.75, t0=2.0)
    eta, mu = reference.asgd_taken(t, **kw)
    runs = []
    for given in (dict(), dict(eta=eta, mu=mu), dict(eta=0.2, mu=1.0)):
        p, ax = [a.copy() for a in params], [a.copy() for a in axs]
        fastopt.asgd_(p, grads, ax, step=t, **kw, **given)
        ref = [a.astype(np.float64) for a in params]
        ref_ax = [a.astype(np.float64) for a in axs]
        for r, g, a in zip(ref, grads, ref_ax):
            reference.asgd(r, g.astype(np.float64), a, step=t, **kw, **given)
        assert_close(p, ref, np.float32, f"params {given}")
        assert_close(ax, ref_ax, np.float32, f"axs {given}")
        runs.append((p, ax))
    (p0, a0), (p1, a1), (p2, a2) = runs
    assert all(np.array_equal(x, y) for x, y in zip(p0 + a0, p1 + a1))
    assert all(np.array_equal(x, y) for x, y in zip(p2, a2)), "mu = 1: ax is the params"


@pytest.mark.parametrize("name,bad,error", [("eta", -0.1, ValueError),
                                            ("eta", float("nan"), ValueError),
                                            ("mu", 1.5, ValueError), ("mu", "x", TypeError)])
def test_bad_eta_or_mu_is_refused(name, bad, error, rng):
    p = normal_nonzero(rng, (9,)).astype(np.float32)
    ax = np.zeros(9, np.float32)
    before = p.copy()
    with pytest.raises(error, match=f"^{name}:"):
        fastopt.asgd_(p, p.copy(), ax, step=1, **{name: bad})
    assert np.array_equal(p, before) and not ax.any()


# ---- fastopt.torch.ASGD -------------------------------------------------------------------------



def _pair(seed=0, **kw):
    """torch.optim.ASGD and fastopt.torch.ASGD over copies of the same params."""
    gen = torch.Generator().manual_seed(seed)
    start = [torch.randn(s, generator=gen) for s in [(1,), (33,), (7, 5), (4097,)]]
    theirs = [p.clone().requires_grad_() for p in start]
    ours = [p.clone().requires_grad_() for p in start]
    return (theirs, torch.optim.ASGD(theirs, foreach=False, **kw),
            ours, ft.ASGD(ours, **kw))


@needs_torch
def test_torch_eta_and_mu_bit_for_bit():
    # state["eta"] and state["mu"] hold torch's bits after every step: across t0 (the
    # average starts), under a scheduler changing lr (eta follows it one step later, as in
    # torch), and across checkpoints both ways; params and ax close to torch's.
    gen = torch.Generator().manual_seed(1)
    theirs, topt, ours, fopt = _pair(lr=0.05, lambd=0.01, alpha=0.6, t0=4.0, weight_decay=0.01)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5) for o in (topt, fopt)]
    for t in range(12):
        if t == 8:
            fopt.load_state_dict(torch_roundtrip(topt.state_dict()))
            topt.load_state_dict(torch_roundtrip(fopt.state_dict()))
        for a, b in zip(theirs, ours):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        topt.step()
        fopt.step()
        for sched in scheds:
            sched.step()
        for a, b in zip(theirs, ours):
            for key in ("eta", "mu", "step"):
                want, got = topt.state[a][key], fopt.state[b][key]
                assert got.dtype == want.dtype and torch.equal(got, want), (t, key)
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(fopt.state[b]["ax"], topt.state[a]["ax"], rtol=1e-5,
                                       atol=1e-6)
    assert float(fopt.state[ours[0]]["mu"]) < 1.0  # (the average did start)


@needs_torch
def test_torch_eta_and_mu_edited_are_followed():
    gen = torch.Generator().manual_seed(2)
    theirs, topt, ours, fopt = _pair(lr=0.05, t0=1.0)
    for _ in range(2):
        for a, b in zip(theirs, ours):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        topt.step()
        fopt.step()
        for opt, ps in ((topt, theirs), (fopt, ours)):
            opt.state[ps[0]]["eta"].fill_(0.125)
            opt.state[ps[1]]["mu"] = torch.tensor(0.5)
    for a, b in zip(theirs, ours):
        for key in ("eta", "mu"):
            assert torch.equal(fopt.state[b][key], topt.state[a][key]), key
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fopt.state[b]["ax"], topt.state[a]["ax"], rtol=1e-5,
                                   atol=1e-6)
    # (the edits were stepped: ps[0] took eta 0.125 at step 2, ps[1] averaged with mu 0.5)
    assert not torch.equal(fopt.state[ours[1]]["ax"], ours[1].detach())


@needs_torch
@pytest.mark.parametrize("key,bad,error", [("eta", -1.0, ValueError), ("mu", 2.0, ValueError),
                                           ("eta", "x", TypeError)])
def test_torch_bad_eta_or_mu_is_refused(key, bad, error):
    gen = torch.Generator().manual_seed(3)
    _, _, ours, fopt = _pair(lr=0.05)
    for p in ours:
        p.grad = torch.randn(p.shape, generator=gen)
    fopt.step()
    fopt.state[ours[2]][key] = bad
    before = [p.detach().clone() for p in ours]
    with pytest.raises(error, match=rf"state of param_groups\[0\]\['params'\]\[2\]: '{key}'"):
        fopt.step()
    assert all(torch.equal(p, b) for p, b in zip(ours, before))
