"""fastopt.torch under torch.distributed: DistributedDataParallel, ZeroRedundancyOptimizer and
FSDP2 (fully_shard), each against torch.optim under the same wrapper (the same trajectory),
Adafactor under DDP and ZeroRedundancyOptimizer, plus FSDP2's distributed optimizer
checkpoints (get/set_optimizer_state_dict) both ways, and stochastic rounding of sharded
bfloat16 params (each shard its own bits).

Two processes with the gloo backend on the CPU (the CUDA variant: NCCL, one process per GPU,
up to two). Starting processes is slow, so one group of workers runs every scenario and
leaves one result file per scenario and rank; each test reads its own.
"""
from __future__ import annotations

import copy
import datetime
import os
import traceback
from typing import Any, Callable, Dict, List

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import fastopt  # noqa: E402
import fastopt.torch as ft  # noqa: E402

STEPS = 4
RTOL, ATOL = 1e-5, 1e-6  # float32, both sides the same formulas (see test_torch_optim)


def _mlp(device: str) -> Any:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 4)).to(device)


def _batches(rank: int, device: str, seed: int = 0) -> List[Any]:
    g = torch.Generator().manual_seed(100 * seed + rank)
    return [(torch.randn(16, 8, generator=g).to(device), torch.randn(16, 4, generator=g).to(device))
            for _ in range(STEPS)]


def _train(model: Any, opt: Any, batches: List[Any]) -> None:
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _options(module: Any) -> Dict[str, Any]:
    return dict(lr=1e-2, weight_decay=0.1, amsgrad=True,
                **(dict(foreach=False) if module is torch.optim else {}))


def _assert_close(got: List[Any], want: List[Any], what: str) -> None:
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL,
                                   msg=lambda m, i=i: f"{what}[{i}]: {m}")


def _full(t: Any) -> Any:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()


# ---- scenarios (run in every worker) ------------------------------------------------------------

def _ddp(rank: int, device: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP
    finals = []
    for module in (torch.optim, ft):
        model = DDP(_mlp(device))
        opt = module.AdamW(model.parameters(), **_options(module))
        _train(model, opt, _batches(rank, device))
        finals.append([p.detach().cpu() for p in model.parameters()])
    _assert_close(finals[1], finals[0], "DDP params")


def _zero(rank: int, device: str) -> None:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP
    finals, states = [], []
    for module in (torch.optim, ft):
        model = DDP(_mlp(device))
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=module.AdamW,
                                      **_options(module))
        _train(model, opt, _batches(rank, device))
        finals.append([p.detach().cpu() for p in model.parameters()])
        opt.consolidate_state_dict(to=0)
        if rank == 0:
            sd = opt.state_dict()
            states.append([sd["state"][i][k].cpu() for i in sorted(sd["state"])
                           for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")])
    _assert_close(finals[1], finals[0], "ZeRO params")
    if rank == 0:
        _assert_close(states[1], states[0], "ZeRO consolidated state")


def _adafactor(rank: int, device: str) -> None:
    """Adafactor (a kernel of its own, param by param) under DDP and ZeRO: ZeRO gives each
    rank whole params, which Adafactor steps as on one machine."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP
    for wrapper in ("ddp", "zero"):
        finals = []
        for module in (torch.optim, ft):
            model = DDP(_mlp(device))
            options = dict(lr=1e-2, weight_decay=0.1)
            opt = (module.Adafactor(model.parameters(), **options) if wrapper == "ddp" else
                   ZeroRedundancyOptimizer(model.parameters(), optimizer_class=module.Adafactor,
                                           **options))
            _train(model, opt, _batches(rank, device))
            finals.append([p.detach().cpu() for p in model.parameters()])
        _assert_close(finals[1], finals[0], f"Adafactor under {wrapper}, params")


def _sharded(device: str) -> Any:
    from torch.distributed.fsdp import fully_shard
    model = _mlp(device)
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer)
    fully_shard(model)
    return model


def _fsdp2(rank: int, device: str) -> None:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.tensor import DTensor
    models, opts = [], []
    for module in (torch.optim, ft):
        model = _sharded(device)
        opt = module.AdamW(model.parameters(), **_options(module))
        _train(model, opt, _batches(rank, device))
        models.append(model)
        opts.append(opt)
    _assert_close([_full(p) for p in models[1].parameters()],
                  [_full(p) for p in models[0].parameters()], "FSDP2 params")
    p = next(models[1].parameters())
    assert isinstance(p, DTensor)
    state = opts[1].state[p]
    assert isinstance(state["exp_avg"], DTensor) and state["exp_avg"].placements == p.placements
    assert not isinstance(state["step"], DTensor) and float(state["step"]) == STEPS
    sds = [get_optimizer_state_dict(m, o) for m, o in zip(models, opts)]
    assert sds[0]["state"].keys() == sds[1]["state"].keys()
    assert ([sorted(v) for v in sds[0]["state"].values()]
            == [sorted(v) for v in sds[1]["state"].values()])
    for fqn, entry in sds[0]["state"].items():
        _assert_close([_full(v) for _, v in sorted(sds[1]["state"][fqn].items())],
                      [_full(v) for _, v in sorted(entry.items())], f"FSDP2 state {fqn}")


def _fsdp2_checkpoints(rank: int, device: str) -> None:
    """A distributed optimizer checkpoint of one side loads into the other, which then
    continues on the trajectory of the saving side."""
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )
    for first, second in ((torch.optim, ft), (ft, torch.optim)):
        model = _sharded(device)
        opt = first.AdamW(model.parameters(), **_options(first))
        _train(model, opt, _batches(rank, device, seed=1))
        resumed = _sharded(device)
        resumed.load_state_dict(model.state_dict())
        opt2 = second.AdamW(resumed.parameters(), **_options(second))
        # a copy, as a checkpoint on disk: the dict holds opt's own step tensors
        saved = copy.deepcopy(get_optimizer_state_dict(model, opt))
        set_optimizer_state_dict(resumed, opt2, saved)
        more = _batches(rank, device, seed=2)
        _train(model, opt, more)
        _train(resumed, opt2, more)
        _assert_close([_full(p) for p in resumed.parameters()],
                      [_full(p) for p in model.parameters()],
                      f"FSDP2 {first.__name__} -> {second.__name__} params")


def _fsdp2_rounding(rank: int, device: str) -> None:
    """Stochastic rounding of a bfloat16 param sharded over the ranks: the shards draw bits
    of their own (the local element indices repeat on every rank), reproducibly."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    world = dist.get_world_size()
    mesh = init_device_mesh(device.split(":")[0], (world,))
    n, ulp = 4096 * world, 2.0 ** -7  # every element 1 + ulp/2: up or down with odds 1/2

    def param(placement):
        p = torch.nn.Parameter(distribute_tensor(
            torch.ones(n, dtype=torch.bfloat16, device=device), mesh, [placement]))
        p.grad = distribute_tensor(torch.full((n,), -ulp / 2, dtype=torch.bfloat16,
                                              device=device), mesh, [placement])
        return p

    ups = []
    for order in (0, 1, 0):  # a replicated param beside it, first or last in the group
        p, replicated = param(Shard(0)), param(Replicate())
        ft.SGD([p, replicated][::1 if order else -1], lr=1.0, stochastic_rounding=True,
               seed=1).step()
        ups.append((p.full_tensor() > 1).cpu().reshape(world, -1))
        # replicas round alike: every rank holds the same values
        mine = replicated.to_local().float().cpu()
        everyone = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(everyone, mine)
        assert all(torch.equal(mine, other) for other in everyone), "replicas diverged"
    assert torch.equal(ups[0], ups[2]), "the same seed, other bits"
    assert 0.45 < ups[0].float().mean() < 0.55
    for r in range(1, world):
        agree = (ups[0][0] == ups[0][r]).float().mean()
        assert 0.45 < agree < 0.55, f"shards 0 and {r} agree on {agree:.3f} of their roundings"


SCENARIOS: Dict[str, Callable[[int, str], None]] = {
    "ddp": _ddp, "zero": _zero, "adafactor": _adafactor, "fsdp2": _fsdp2,
    "fsdp2_checkpoints": _fsdp2_checkpoints, "fsdp2_rounding": _fsdp2_rounding}


def _worker(rank: int, world: int, init_file: str, out_dir: str, device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                            init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    device = f"cuda:{rank}" if device_type == "cuda" else "cpu"
    try:
        for name, scenario in SCENARIOS.items():
            try:
                scenario(rank, device)
                result = "ok"
            except Exception:  # reported by the test of this scenario
                result = traceback.format_exc()
            with open(os.path.join(out_dir, f"{name}.{rank}"), "w") as f:
                f.write(result)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_workers(tmp_path_factory: Any, device_type: str, world: int) -> Any:
    out = tmp_path_factory.mktemp(f"dist-{device_type}")
    torch.multiprocessing.spawn(_worker, args=(world, str(out / "init"), str(out), device_type),
                                nprocs=world, join=True)
    return out, world


@pytest.fixture(scope="module")
def cpu_results(tmp_path_factory):
    return _run_workers(tmp_path_factory, "cpu", 2)


@pytest.fixture(scope="module")
def cuda_results(tmp_path_factory):
    if not (torch.cuda.is_available() and fastopt.cuda_available() and dist.is_nccl_available()):
        pytest.skip("needs a CUDA GPU, fastopt._cuda and NCCL")
    return _run_workers(tmp_path_factory, "cuda", min(2, torch.cuda.device_count()))


def _check(results: Any, scenario: str) -> None:
    out, world = results
    for rank in range(world):
        text = (out / f"{scenario}.{rank}").read_text()
        assert text == "ok", f"rank {rank}:\n{text}"


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_distributed_cpu(cpu_results, scenario):
    _check(cpu_results, scenario)


@pytest.mark.cuda
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_distributed_cuda(cuda_results, scenario):
    _check(cuda_results, scenario)
