"""Vocabulary-parallel CCE (fusedlm.parallel): 2 CPU processes with gloo give the same loss
and gradients as single-process ``linear_cross_entropy`` with the full classifier; a 2x2
(data x tensor parallel) run checks DDP and FSDP2; a CUDA-marked test does the same over
NCCL on 2 GPUs.

Each group of cases runs in one ``torch.multiprocessing.spawn`` (a module-scoped fixture),
so the process start-up is paid once; the tests then compare the recorded results.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedlm
from fusedlm.parallel import vocab_parallel_linear_cross_entropy, vocab_shard_range

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")

N, D, V = 37, 24, 1031  # V odd: the two shards are uneven (516 + 515 rows)
WORLD = 2

# id -> (input options, loss options, mode)
CASES = {
    "default": ({}, {}, None),
    "bias": (dict(bias=True), {}, None),
    "softcap": ({}, dict(softcap=4.0), None),
    "label_smoothing": ({}, dict(label_smoothing=0.1), None),
    "z_loss": ({}, dict(z_loss=1e-3), None),
    "sum": ({}, dict(reduction="sum"), None),
    "none": ({}, dict(reduction="none"), None),
    "shift_batched": (dict(batch=3), dict(shift=True), None),
    "return_lse": (dict(bias=True), dict(return_lse=True, reduction="none"), None),
    "everything": (dict(bias=True), dict(softcap=3.0, label_smoothing=0.2, z_loss=1e-2,
                                         reduction="none"), None),
    # A non-negative ignore_index must not collide with a local row id on any rank.
    "ignore_index_7": (dict(ignore=7), dict(ignore_index=7), None),
    "all_ignored_mean_is_nan": (dict(ignore_frac=1.0), {}, None),
    "float32_filtered": (dict(dtype=torch.float32), dict(filter_eps="auto"), None),
    "bfloat16": (dict(dtype=torch.bfloat16, bias=True), dict(filter_eps="auto",
                                                              label_smoothing=0.1), None),
    "explicit_offsets": ({}, dict(label_smoothing=0.1), "explicit"),
    "dtensor_inputs": (dict(bias=True), {}, "dtensor"),
    "singleton_group": (dict(bias=True), dict(softcap=5.0), "single"),
    "out_of_range_target": (dict(bad_target=True), {}, None),
    # As on CUDA without FUSEDLM_CHECK_TARGETS (no eager range check): NaN for that token.
    "out_of_range_target_unchecked": (dict(bad_target=True), dict(reduction="none"), "unchecked"),
    # V < ranks: rank 1's shard is empty and must still join every collective.
    "empty_shard": (dict(v=1, bias=True), dict(label_smoothing=0.1), None),
    "autocast_bfloat16": (dict(dtype=torch.float32, bias=True), dict(softcap=6.0), "autocast"),
    # A frozen classifier and bias (LoRA): only dE, still all-reduced over the ranks.
    "frozen_classifier": (dict(bias=True), dict(label_smoothing=0.1), "frozen"),
    # torch.compile (aot_eager; graph breaks at the collectives are allowed)
    "compiled": (dict(bias=True), dict(label_smoothing=0.1, z_loss=1e-3), "compiled"),
}


def make_case(batch=None, bias=False, dtype=torch.float64, ignore_frac=0.2, ignore=-100,
              bad_target=False, v=V):
    shape = (N,) if batch is None else (batch, N)
    e = torch.randn(*shape, D, dtype=torch.float64).to(dtype)
    c = (torch.randn(v, D, dtype=torch.float64) / D**0.25).to(dtype)
    b = torch.randn(v, dtype=torch.float64).to(dtype) if bias else None
    y = torch.randint(0, v, shape)
    y[torch.rand(shape) < ignore_frac] = ignore
    if ignore >= 0:  # targets equal to the ignored id's local row on the other rank
        flat = y.view(-1)
        flat[0], flat[1] = ignore, vocab_shard_range(V, 1, WORLD)[0] + ignore
    if bad_target:
        y.view(-1)[2] = V
    return e, c, y, b


def _case_inputs(cid):
    make_kw, loss_kw, mode = CASES[cid]
    e, c, y, b = make_case(**make_kw)
    out_shape = () if loss_kw.get("reduction", "mean") != "none" else y.shape
    g_out = torch.randn(out_shape, dtype=torch.float64)
    g_lse = torch.randn(y.shape, dtype=torch.float64) if loss_kw.get("return_lse") else None
    return dict(e=e, c=c, y=y, b=b, kw=loss_kw, mode=mode, g_out=g_out, g_lse=g_lse)


def _loss_and_grads(fn, e, c, y, b, kw, g_out, g_lse, leaves=None, autocast=False):
    """Run ``fn``, back-propagate (g_out, g_lse) and return float64 CPU copies."""
    with torch.autocast(e.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = fn(e, c, y, b, **kw)
    loss, lse = out if kw.get("return_lse") else (out, None)
    roots, grads = [loss], [g_out.to(loss.dtype).to(loss.device)]
    if lse is not None:
        roots.append(lse)
        grads.append(g_lse.to(lse.dtype).to(lse.device))
    torch.autograd.backward(roots, grads)
    e, c, b = leaves or (e, c, b)
    cpu = lambda t: None if t is None else t.detach().double().cpu()  # noqa: E731
    return dict(loss=cpu(loss), lse=cpu(lse), de=cpu(e.grad), dc=cpu(c.grad),
                db=cpu(None if b is None else b.grad))


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_()


def reference(case):
    e, c, b = _leaf(case["e"]), _leaf(case["c"]), _leaf(case["b"])
    if case["mode"] == "frozen":
        c, b = case["c"], case["b"]
    return _loss_and_grads(fusedlm.linear_cross_entropy, e, c, case["y"], b, case["kw"],
                           case["g_out"], case["g_lse"], autocast=case["mode"] == "autocast")


def _run_case(case, rank, world, singleton):
    start, end = vocab_shard_range(case["c"].shape[0], rank, world)
    kw = dict(case["kw"])
    e = _leaf(case["e"])
    c_full, b_full = case["c"], case["b"]
    c, b = _leaf(c_full[start:end]), _leaf(None if b_full is None else b_full[start:end])
    fn, leaves, e_in, c_in, b_in = fusedlm.linear_cross_entropy, None, e, c, b
    kw["process_group"] = dist.group.WORLD
    if case["mode"] == "single":  # a group of one rank: the plain single-process path
        kw["process_group"] = singleton
        c, b = _leaf(c_full), _leaf(b_full)
        c_in, b_in = c, b
    elif case["mode"] == "frozen":
        c_in, b_in = c.detach(), b.detach()
        leaves = (e, c_in, b_in)
    elif case["mode"] == "compiled":
        fn = torch.compile(fusedlm.linear_cross_entropy, backend="aot_eager")
    elif case["mode"] == "explicit":
        fn = vocab_parallel_linear_cross_entropy
        kw.update(vocab_start_index=start, vocab_size=case["c"].shape[0])
    elif case["mode"] == "dtensor":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Replicate, Shard

        mesh = init_device_mesh("cpu", (world,))
        kw["process_group"] = mesh
        e_in = DTensor.from_local(e, mesh, [Replicate()], run_check=False)
        c_in = DTensor.from_local(c, mesh, [Shard(0)], run_check=False, shape=c_full.shape,
                                  stride=c_full.stride())
        b_in = DTensor.from_local(b, mesh, [Shard(0)], run_check=False, shape=b_full.shape,
                                  stride=b_full.stride())
        leaves = (e, c, b)
    import fusedlm.parallel as parallel

    check = parallel._check_targets
    if case["mode"] == "unchecked":
        parallel._check_targets = lambda *args: None
    try:
        return _loss_and_grads(fn, e_in, c_in, case["y"], b_in, kw, case["g_out"],
                               case["g_lse"], leaves, autocast=case["mode"] == "autocast")
    except Exception as err:  # noqa: BLE001 - reported to the parent
        return dict(error=f"{type(err).__name__}: {err}")
    finally:
        parallel._check_targets = check


def _gloo_worker(rank, world, store, path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world)
    try:
        cases = torch.load(path)
        singles = [dist.new_group([r]) for r in range(world)]
        results = {cid: _run_case(case, rank, world, singles[rank])
                   for cid, case in cases.items()}
        torch.save(results, f"{path}.rank{rank}")
    finally:
        dist.destroy_process_group()


def _spawn(worker, nprocs, tmp, payload, start_method="fork"):
    """Run ``worker(rank, nprocs, store, path)`` in ``nprocs`` processes. CPU tests fork
    (the children inherit the imported torch/fusedlm: seconds faster on a small runner);
    CUDA tests must spawn."""
    path = os.path.join(tmp, "inputs.pt")
    torch.save(payload, path)
    if start_method == "fork" and ("fork" not in mp.get_all_start_methods() or torch.cuda.is_available()):
        # With a GPU, a forked child fails once CUDA started in the parent (inductor uses it)
        # or autograd started its device threads (any backward of an earlier test).
        start_method = "spawn"
    mp.start_processes(worker, args=(nprocs, os.path.join(tmp, "store"), path), nprocs=nprocs,
                       join=True, start_method=start_method)
    return [torch.load(f"{path}.rank{r}") for r in range(nprocs)]


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory):
    if not dist.is_gloo_available():
        pytest.skip("gloo backend not available")
    torch.manual_seed(1234)
    cases = {cid: _case_inputs(cid) for cid in CASES}
    per_rank = _spawn(_gloo_worker, WORLD, str(tmp_path_factory.mktemp("vp_gloo")), cases)
    return cases, per_rank


def _tolerances(dtype):
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-12), dict(rtol=1e-9, atol=1e-12)
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-6), dict(rtol=1e-4, atol=1e-6)
    return dict(rtol=1e-3, atol=1e-3), dict(rtol=2e-2, atol=2e-2)


def _compare(got, want, loss_tol, grad_tol, vocab_split=True):
    torch.testing.assert_close(got[0]["loss"], want["loss"], equal_nan=True, **loss_tol)
    for g in got:  # the loss and dE are replicated on every rank of the group
        torch.testing.assert_close(g["loss"], got[0]["loss"], rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(g["de"], got[0]["de"], rtol=0, atol=0, equal_nan=True)
    if want["lse"] is not None:
        torch.testing.assert_close(got[0]["lse"], want["lse"], **loss_tol)
    torch.testing.assert_close(got[0]["de"], want["de"], equal_nan=True, **grad_tol)
    for key in ("dc", "db"):
        if want[key] is None:
            assert all(g[key] is None for g in got)
            continue
        full = torch.cat([g[key] for g in got]) if vocab_split else got[0][key]
        torch.testing.assert_close(full, want[key], equal_nan=True, **grad_tol)


@pytest.mark.parametrize("cid", [c for c in CASES if not c.startswith("out_of_range_target")])
def test_two_ranks_match_single_process(cid, gloo_results):
    cases, per_rank = gloo_results
    got = [r[cid] for r in per_rank]
    assert all("error" not in g for g in got), [g.get("error") for g in got]
    case = cases[cid]
    want = reference(case)
    loss_tol, grad_tol = _tolerances(
        torch.bfloat16 if case["mode"] == "autocast" else case["e"].dtype)
    if cid == "all_ignored_mean_is_nan":
        assert torch.isnan(want["loss"]) and torch.isnan(got[0]["loss"])
    _compare(got, want, loss_tol, grad_tol, vocab_split=CASES[cid][2] != "single")


def test_out_of_range_target_raises_on_every_rank(gloo_results):
    _, per_rank = gloo_results
    for r in per_rank:
        assert r["out_of_range_target"].get("error", "").startswith("IndexError"), r


def test_unchecked_out_of_range_target_gives_nan(gloo_results):
    """Without the eager check (CUDA's default) a target no rank owns gives NaN for its token,
    not the finite loss of a target logit of 0; the other tokens are unaffected."""
    _, per_rank = gloo_results
    for r in per_rank:
        loss = r["out_of_range_target_unchecked"]["loss"].reshape(-1)
        others = torch.ones_like(loss, dtype=torch.bool)
        others[2] = False  # make_case(bad_target=True) puts V there
        assert loss[2].isnan() and loss[others].isfinite().all(), loss


def test_needs_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    e, c, y, _ = make_case()
    with pytest.raises(RuntimeError, match="init_process_group"):
        fusedlm.linear_cross_entropy(e, c, y, process_group=object())


# ------------------------------------------------------------- DDP and FSDP2 (2 x 2 mesh)

class _TinyLM(torch.nn.Module):
    """A trunk replicated over the tensor-parallel ranks and a vocabulary-sharded head."""

    def __init__(self, trunk_state, head_shard, tp_group):
        super().__init__()
        self.trunk = torch.nn.Linear(D, D, dtype=torch.float64)
        self.trunk.load_state_dict(trunk_state)
        self.head = torch.nn.Parameter(head_shard.clone())
        self.tp_group = tp_group

    def forward(self, x, y):
        h = torch.tanh(self.trunk(x))
        return fusedlm.linear_cross_entropy(h, self.head, y, process_group=self.tp_group,
                                            filter_eps=None, shift=True)


def _dp_tp_worker(rank, world, store, path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world)
    try:
        data = torch.load(path)
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        dp, tp = mesh["dp"].get_local_rank(), mesh["tp"].get_local_rank()
        start, end = vocab_shard_range(V, tp, 2)
        x, y = data["x"][dp], data["y"][dp]  # each data-parallel replica: its own batch
        results = {}
        for mode in ("ddp", "fsdp2"):
            model = _TinyLM(data["trunk"], data["c"][start:end], mesh["tp"].get_group())
            if mode == "ddp":
                wrapped = DDP(model, process_group=mesh["dp"].get_group())
            else:
                wrapped = fully_shard(model, mesh=mesh["dp"])
            loss = wrapped(x, y)
            loss.backward()
            grads = {k: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
                     for k, p in model.named_parameters()}
            results[mode] = dict(loss=loss.detach(), grads=grads)
        torch.save(results, f"{path}.rank{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def dp_tp_results(tmp_path_factory):
    if not dist.is_gloo_available():
        pytest.skip("gloo backend not available")
    torch.manual_seed(4321)
    trunk = torch.nn.Linear(D, D, dtype=torch.float64)
    data = dict(trunk=trunk.state_dict(), c=torch.randn(V, D, dtype=torch.float64) / D**0.5,
                x=torch.randn(2, 3, 5, D, dtype=torch.float64), y=torch.randint(0, V, (2, 3, 5)))
    per_rank = _spawn(_dp_tp_worker, 4, str(tmp_path_factory.mktemp("vp_dp_tp")), data)
    # Reference: one process, full classifier, DDP/FSDP's average over the two batches.
    c = data["c"].clone().requires_grad_()
    losses = [fusedlm.linear_cross_entropy(torch.tanh(trunk(data["x"][i])), c, data["y"][i],
                                           filter_eps=None, shift=True) for i in range(2)]
    (sum(losses) / 2).backward()
    ref = dict(losses=[l.detach() for l in losses], trunk_w=trunk.weight.grad,
               trunk_b=trunk.bias.grad, head=c.grad)
    return per_rank, ref


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_data_parallel_x_vocab_parallel(mode, dp_tp_results):
    per_rank, ref = dp_tp_results
    tol = dict(rtol=1e-10, atol=1e-12)
    for rank, res in enumerate(per_rank):
        dp, tp = divmod(rank, 2)
        got = res[mode]
        torch.testing.assert_close(got["loss"], ref["losses"][dp], **tol)
        torch.testing.assert_close(got["grads"]["trunk.weight"], ref["trunk_w"], **tol)
        torch.testing.assert_close(got["grads"]["trunk.bias"], ref["trunk_b"], **tol)
        start, end = vocab_shard_range(V, tp, 2)
        torch.testing.assert_close(got["grads"]["head"], ref["head"][start:end], **tol)


# ------------------------------------------------------------- NCCL on 2 GPUs

NCCL_CASES = {
    "float32": (dict(dtype=torch.float32, bias=True), dict(filter_eps=None, softcap=30.0,
                                                           label_smoothing=0.1, z_loss=1e-4)),
    "bfloat16": (dict(dtype=torch.bfloat16, batch=4), dict(shift=True)),
}


def _nccl_worker(rank, world, store, path):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank,
                            world_size=world, device_id=torch.device("cuda", rank))
    try:
        cases = torch.load(path)
        start, end = vocab_shard_range(V, rank, world)
        results = {}
        for cid, case in cases.items():
            dev = torch.device("cuda", rank)
            e, c_full = _leaf(case["e"].to(dev)), case["c"].to(dev)
            b_full = None if case["b"] is None else case["b"].to(dev)
            y = case["y"].to(dev)
            c, b = _leaf(c_full[start:end]), _leaf(None if b_full is None else b_full[start:end])
            got = _loss_and_grads(fusedlm.linear_cross_entropy, e, c, y, b,
                                  dict(case["kw"], process_group=dist.group.WORLD),
                                  case["g_out"], case["g_lse"])
            e1, c1, b1 = _leaf(case["e"].to(dev)), _leaf(c_full), _leaf(b_full)
            want = _loss_and_grads(fusedlm.linear_cross_entropy, e1, c1, y, b1, case["kw"],
                                   case["g_out"], case["g_lse"])
            want["dc"] = want["dc"][start:end]
            want["db"] = None if want["db"] is None else want["db"][start:end]
            results[cid] = (got, want)
        torch.save(results, f"{path}.rank{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2 or not dist.is_nccl_available(),
                    reason="needs 2 CUDA GPUs and NCCL")
def test_two_gpus_nccl_match_single_gpu(tmp_path):
    torch.manual_seed(99)
    cases = {}
    for cid, (make_kw, loss_kw) in NCCL_CASES.items():
        e, c, y, b = make_case(**make_kw)
        cases[cid] = dict(e=e, c=c, y=y, b=b, kw=loss_kw, mode=None,
                          g_out=torch.tensor(1.0, dtype=torch.float64), g_lse=None)
    per_rank = _spawn(_nccl_worker, 2, str(tmp_path), cases, start_method="spawn")
    for cid in cases:
        loss_tol, grad_tol = _tolerances(cases[cid]["e"].dtype)
        for rank in range(2):
            got, want = per_rank[rank][cid]
            torch.testing.assert_close(got["loss"], want["loss"], **loss_tol)
            torch.testing.assert_close(got["dc"], want["dc"], **grad_tol)
            if want["db"] is not None:
                torch.testing.assert_close(got["db"], want["db"], **grad_tol)
            torch.testing.assert_close(got["de"], want["de"], **grad_tol)
