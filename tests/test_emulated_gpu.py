"""sphrun's CUDA path on the CPU, through an emulated device and a model of CUDA-graph capture
(tests/emulated_cuda.py): the commands with --device auto and cuda, graph replay against eager training
bit for bit, the bugs the capture model catches, the first replay's check, and the CUDA form of the pack
against the CPU form."""

import gc
import os
import signal
import sys

import pytest
import torch

import sphrun.train as training
from sphrun.config import TrainConfig
from sphrun.packed import PackedConvNet, TrainingStep
from sphrun.rundir import RunDir
from sphrun.train import Interrupted, StopRequest, train, train_sweep
from sphrun.finetune import finetune

from conftest import REPO, TINY
from emulated_cuda import EmulationError, invalidated_capture
from test_host_stalls import a_pass, steps_cost

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import gpu_check  # noqa: E402  (its deliberate divergence)

sys.path.pop(0)

# 12 steps of 4 per epoch: 3 eager warm-up steps, the capture at step 4, an evaluation at 6 between
# replays, and epochs changing under the graph
GPU = dict(TINY, subset=128, device="cuda", iters=12, eval_every=6)
TINY_ARGS = ["--dataset", "synthetic", "--subset", "256", "--width", "4", "--batch-size", "32"]


def configs(elrs=(1e-3,), **settings):
    return [TrainConfig(**{**GPU, "elr": elr, **settings}) for elr in elrs]


def train_all(configs, folder, pack=None):
    """Train `configs` into `folder`: one run alone, several as a sweep; returns the run directories."""
    if len(configs) == 1:
        return [str(train(configs[0], os.path.join(folder, "run"))[0])]
    return [str(run) for run, _ in train_sweep(configs, folder, pack)]


def eagerly(monkeypatch):
    """From now on, CUDA steps are never captured (the eager reference)."""
    monkeypatch.setattr(TrainingStep, "capture", lambda self: setattr(self, "eager_only", True))


def history(run):
    """A run's metrics rows (wall time aside) and every checkpoint's tensors, to compare bit for bit."""
    run = RunDir(run)
    rows = [{k: v for k, v in r.items() if k != "wall_s"} for r in run.read_metrics()]
    names = sorted(os.listdir(run.checkpoint_dir))
    checkpoints = {n: torch.load(os.path.join(run.checkpoint_dir, n), weights_only=True) for n in names}
    for checkpoint in checkpoints.values():
        checkpoint.pop("wall_s")
    return rows, checkpoints, run.read_config()["status"]


def same_history(a, b):
    (rows_a, ckpt_a, status_a), (rows_b, ckpt_b, status_b) = history(a), history(b)
    return rows_a == rows_b and status_a == status_b and ckpt_a.keys() == ckpt_b.keys() and all(
        equal_values(ckpt_a[n], ckpt_b[n]) for n in ckpt_a)


def equal_values(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal_values(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal_values(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def stop_after(monkeypatch, steps):
    """Ctrl-C once `steps` steps of the next pass have been taken, as StopRequest reports it."""
    class Stop(StopRequest):
        checks = 0

        def __init__(self):
            super().__init__()
            self.signum = None

        @property
        def requested(self):
            Stop.checks += 1
            self.signum = signal.SIGINT if Stop.checks >= steps else None
            return self.signum is not None

    monkeypatch.setattr(training, "StopRequest", Stop)


# --- the commands -------------------------------------------------------------------------------------

def test_every_command_takes_the_cuda_path(cuda, cli, tmp_path, monkeypatch):
    grouped, benchmark, tf32_while_measuring = [], [], []
    real_grouped, real_take = PackedConvNet.forward_grouped, TrainingStep.take
    monkeypatch.setattr(PackedConvNet, "forward_grouped", lambda self, x: (grouped.append(1), real_grouped(self, x))[1])
    monkeypatch.setattr(TrainingStep, "take", lambda self, it, batch: (benchmark.append(torch.backends.cudnn.benchmark),
                                                               real_take(self, it, batch))[1])
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # restored by the fixture
    import sphrun.curvature
    real_measure = sphrun.curvature.measure

    def measure(*args, **kwargs):
        tf32_while_measuring.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(sphrun.curvature, "measure", measure)
    auto, cuda_ = ["--device", "auto"], ["--device", "cuda"]
    a, b, pack = tmp_path / "a", tmp_path / "a-ft", tmp_path / "pack"
    for args in (["train", "--elr", "1e-3", "--iters", "12", "--eval-every", "6", *TINY_ARGS, *auto, "--out", a],
                 ["train", "--elr", "1e-3,1e-2", "--iters", "12", "--eval-every", "6", *TINY_ARGS, *cuda_, "--out",
                  pack],
                 ["finetune", a, "--elr", "2e-3", "--iters", "8", "--eval-every", "4", *auto, "--out", b],
                 ["connect", a, b, "--points", "3", *cuda_, "--out", tmp_path / "ab"],
                 ["curvature", a, "--at", "last", "--probes", "1", "--lanczos", "2", "--batches", "2", *auto],
                 ["curvature", a, "--at", "last", "--measures", "hessian-density", "--probes", "1", "--lanczos",
                  "2", "--batches", "2", *cuda_],
                 ["curvature", a, "--at", "last", "--measures", "gm", "--recompute", *cuda_]):
        code, err = cli(*args)
        assert code == 0, err
        if args[0] in ("train", "finetune"):
            assert "on cuda:0" in err and "capture failed" not in err and "differs" not in err
    c = next(run for run in pack.iterdir() if "elr0.01-" in run.name)  # a's init, another ELR
    code, err = cli("connect", a, b, c, "--grid", "2", *cuda_, "--out", tmp_path / "abc")
    assert code == 0 and "4 per pass" in err, err  # the four points packed, in the grouped form
    assert len(cuda.graphs) == 3 and all(g.replays > 0 for g in cuda.graphs)  # a graph per pass, replayed
    assert grouped and all(benchmark)  # the pack's grouped form; cuDNN picks its kernels once
    assert tf32_while_measuring == [(False, False)] * len(tf32_while_measuring) and tf32_while_measuring
    assert RunDir(a).read_config()["status"] == RunDir(b).read_config()["status"] == "done"
    assert open(tmp_path / "ab" / "connect.csv").read().count("\n") == 4
    assert open(a / "hessian-density.csv").readline() == "iter,eigenvalue,density\n"
    assert open(tmp_path / "abc" / "plane.csv").read().count("\n") == 5


def test_a_cuda_device_without_its_index_is_the_current_one(cuda, monkeypatch):
    from sphrun.lifecycle import use_device

    chosen = []
    monkeypatch.setattr(torch._C, "_cuda_setDevice", chosen.append)
    assert use_device("auto") == use_device("cuda") == torch.device("cuda", 0)
    assert chosen == [0, 0]


# --- graph replay against eager training ----------------------------------------------------------

VARIANTS = {
    "sgd": dict(configs=configs()),
    "sgd packed": dict(configs=configs((1e-3, 1e-1))),
    "random": dict(configs=configs((1e-3, 1e-2), step="random")),
    "ascent": dict(configs=configs((1e-3, 1e-2), step="ascent")),
    "geodesic": dict(configs=configs((1e-3, 1e-2), geodesic=True)),
    "mse": dict(configs=configs((1e-3, 1e-2), loss="mse")),
    "bf16": dict(configs=configs((1e-3, 1e-2), precision="bf16", iters=6, eval_every=6)),
    "vgg16bn": dict(configs=configs(model="vgg16bn", width=2, iters=8, eval_every=4)),
    "resnet18": dict(configs=configs(model="resnet18", width=2, iters=8, eval_every=4)),
    "off the sphere": dict(configs=configs((0.05,), sphere=False, momentum=0.9, wd=1e-3)),
    "seeds x data seeds, 4 passes": dict(configs=[
        TrainConfig(**{**GPU, "iters": 6, "eval_every": 6, "elr": e, "seed": s, "data_seed": d})
        for e in (1e-3, 1e-2) for s in (0, 1) for d in (0, 1)], pack=2),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_graph_replay_equals_eager_training(cuda, tmp_path, monkeypatch, capsys, variant):
    settings = VARIANTS[variant]
    graphed = train_all(settings["configs"], str(tmp_path / "graph"), settings.get("pack"))
    assert cuda.graphs and all(g.replays for g in cuda.graphs)
    assert "differs" not in capsys.readouterr().err
    eagerly(monkeypatch)
    eager = train_all(settings["configs"], str(tmp_path / "eager"), settings.get("pack"))
    for a, b in zip(graphed, eager):
        assert same_history(a, b), a


def fine_tuned_along_a_transition(tmp_path, monkeypatch):
    """A fine-tune whose rate moves for 10 steps, 7 after the capture: with the graph, then eagerly."""
    [parent] = train_all(configs(iters=4, eval_every=4), str(tmp_path / "parent"))
    runs = {}
    for name in ("graph", "eager"):
        if name == "eager":
            eagerly(monkeypatch)
        runs[name], _ = finetune(parent, 1e-2, iters=12, transition=10, eval_every=4, device="cuda",
                                 out=str(tmp_path / name))
    return runs["graph"], runs["eager"]


def test_a_transition_past_the_capture_replays_the_new_rates(cuda, tmp_path, monkeypatch):
    graphed, eager = fine_tuned_along_a_transition(tmp_path, monkeypatch)
    rates = [r["elr"] for r in RunDir(graphed).read_metrics()]
    assert rates[0] < rates[1] < rates[2] < rates[3] == 1e-2  # the rate moved after the capture at step 7
    assert same_history(graphed, eager)


def test_ctrl_c_and_resume_replay_as_eager_training(cuda, tmp_path, monkeypatch):
    results = {}
    for name in ("graph", "eager"):
        if name == "eager":
            eagerly(monkeypatch)
        with monkeypatch.context() as m:
            stop_after(m, 8)
            with pytest.raises(Interrupted):
                train_all(configs((1e-3, 1e-2)), str(tmp_path / name))
        results[name] = train_all(configs((1e-3, 1e-2)), str(tmp_path / name))
    assert len(cuda.graphs) == 2  # the interrupted pass's and the resumed pass's
    assert [r["iter"] for r in RunDir(results["graph"][0]).read_metrics()] == [0, 6, 12]
    for a, b in zip(results["graph"], results["eager"]):
        assert same_history(a, b)


def test_a_member_diverging_after_the_capture(cuda, tmp_path, monkeypatch):
    with gpu_check.diverging(member=1, from_step=8):
        graphed = train_all(configs((1e-3, 2e-3)), str(tmp_path / "graph"))
        eagerly(monkeypatch)
        eager = train_all(configs((1e-3, 2e-3)), str(tmp_path / "eager"))
    assert [RunDir(r).read_config()["status"] for r in graphed] == ["done", "diverged"]
    assert [r["iter"] for r in RunDir(graphed[1]).read_metrics()] == [0, 6]  # frozen at step 8
    for a, b in zip(graphed, eager):
        assert same_history(a, b)


# --- what the capture model refuses, and the bugs it catches ----------------------------------------------

def test_the_capture_model_runs_no_kernel_bakes_scalars_and_replays_on_the_same_tensors(cuda):
    x = torch.ones(3, device="cuda")
    scale = 2.0
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x.mul_(scale)
        x.add_(torch.ones(3, device="cuda"))
    assert x.tolist() == [1, 1, 1]  # a capture runs nothing
    scale = 10.0  # a Python number is baked into the graph
    graph.replay()
    graph.replay()
    assert x.tolist() == [7, 7, 7] and scale == 10.0  # (1 * 2 + 1) * 2 + 1


@pytest.mark.parametrize("inside", [lambda x: x.add_(torch.randn(3, device="cuda")),
                                    lambda x: x.add_(x.sum().item()),
                                    lambda x: x.add_(torch.tensor([1.0, 2.0, 3.0]).to("cuda"))],
                         ids=["random op", "host sync", "copy from the host"])
def test_the_capture_model_refuses_what_a_gpu_refuses(cuda, inside):
    x = torch.ones(3, device="cuda")
    with pytest.raises(EmulationError, match="inside CUDA graph capture"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            inside(x)
    assert x.tolist() == [1, 1, 1]


def rebinding_batch(self, it, batch):
    self.idx = batch  # the bug: the graph keeps reading the tensor it was captured with
    self.lr.copy_(self.rates[min(it - self.config.origin, len(self.rates) - 1)])
    self.counter.fill_(it)
    self()


def rebinding_rate(self, it, batch):
    self.idx.copy_(batch)
    self.lr = self.rates[min(it - self.config.origin, len(self.rates) - 1)].clone()  # the bug
    self.counter.fill_(it)
    self()


@pytest.mark.parametrize("bug", [rebinding_batch, rebinding_rate], ids=["batch", "learning rate"])
def test_rebinding_an_input_instead_of_copying_into_it_is_caught(cuda, tmp_path, monkeypatch, bug):
    """Eagerly either way is right; a graph reads the tensors it was captured with, so it trains on a
    stale batch or rate: the capture model shows it (the rate changes along a transition)."""
    monkeypatch.setattr(TrainingStep, "take", bug)
    assert not same_history(*fine_tuned_along_a_transition(tmp_path, monkeypatch))


# --- the first replay's check ---------------------------------------------------------------------------

def drop_the_first_weight_update(graph):
    """A wrong graph: the in-place updates of the first weight tensor are missing from it."""
    step = STEPS[-1]
    first = step.params[0]
    graph.recording = [op for op in graph.recording
                       if not (op[0]._schema.is_mutable and any(t is first for t in flat(op[1][:1])))]


STEPS = []


def flat(values):
    out = []
    for v in values:
        out += list(v) if isinstance(v, (list, tuple)) else [v]
    return out


@pytest.fixture
def steps_made(monkeypatch):
    STEPS.clear()
    real_init = TrainingStep.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        STEPS.append(self)

    monkeypatch.setattr(TrainingStep, "__init__", init)


def test_a_wrong_graph_is_caught_by_its_first_replay_and_training_goes_on_eagerly(cuda, tmp_path, monkeypatch,
                                                                                  capsys, steps_made):
    cuda.faults.append(drop_the_first_weight_update)
    checked = train_all(configs((1e-3, 1e-2)), str(tmp_path / "checked"))
    err = capsys.readouterr().err
    assert "note: the CUDA graph's first step differs from the same step taken eagerly (weight 0)" in err
    assert "training without the graph" in err and all(g.replays == 1 for g in cuda.graphs)
    with monkeypatch.context() as m:  # without the check, the wrong graph trains on silently
        m.setattr(TrainingStep, "capture_and_check", lambda self: (self.capture(), self.graph.replay()))
        unchecked = train_all(configs((1e-3, 1e-2)), str(tmp_path / "unchecked"))
    eagerly(monkeypatch)
    eager = train_all(configs((1e-3, 1e-2)), str(tmp_path / "eager"))
    for a, b, c in zip(checked, eager, unchecked):
        assert same_history(a, b) and not same_history(c, b)


def test_a_capture_that_fails_at_its_end_leaves_one_note_and_training_goes_on_eagerly(cuda, tmp_path, monkeypatch,
                                                                                     capsys, steps_made):
    cuda.faults.append(invalidated_capture)
    short = configs(iters=6, eval_every=6)  # the capture at the 4th step, two eager steps after it
    failed = train_all(short, str(tmp_path / "failed"))
    notes = [line for line in capsys.readouterr().err.splitlines() if "note" in line]
    assert notes == ["note: CUDA graph capture failed (RuntimeError: CUDA error: operation failed due to a previous "
                     "error during capture); training without it, more slowly"]
    assert STEPS[-1].graph is None and cuda.graphs[-1].replays == 0
    cuda.faults.clear()
    eagerly(monkeypatch)
    assert same_history(*failed, *train_all(short, str(tmp_path / "eager")))


def memory_taken_by_steps(cuda, tmp_path, count):
    """Device bytes a pass of two models holds after `count` steps beyond what it held before them
    (garbage collected first: the models its pack was made from go in a collection)."""
    _, step, order = a_pass(tmp_path, [1e-3, 1e-2])
    gc.collect()
    before = cuda.allocated
    steps_cost(cuda, step, order, 0, count)
    gc.collect()
    return cuda.allocated - before


def test_a_failed_capture_releases_its_graph_and_memory(cuda, tmp_path, monkeypatch):
    """After a capture that raised at its end, the pass holds what an eager pass holds: the graph's
    recorded results (its memory pool) are freed, not kept beside the eager steps."""
    cuda.faults.append(invalidated_capture)
    failed = memory_taken_by_steps(cuda, tmp_path / "failed", 6)  # 3 eager, the capture, 2 eager
    cuda.faults.clear()
    eagerly(monkeypatch)
    assert failed == memory_taken_by_steps(cuda, tmp_path / "eager", 6)


# --- the CUDA form of the pack against the CPU form -------------------------------------------------------

@pytest.mark.parametrize("elrs", [(1e-3,), (1e-4, 3e-4, 1e-3)], ids=["K=1", "K=3"])
def test_the_cuda_form_of_a_pack_trains_as_the_cpu_form(cuda, tmp_path, elrs):
    """Grouped convolutions, channels_last and reductions over K at once round otherwise than K
    single-model calls (~1e-7). The first steps from the init amplify such differences (by 100x in 4
    steps here, more later): over 4 steps at phase-1 ELRs the metrics agree within 2e-4, while a wrong
    grouped form (models mixed in a convolution or a BatchNorm) is off by far more from step 0."""
    runs = {}
    for device in ("cuda", "cpu"):
        runs[device] = train_all(configs(elrs, device=device, subset=256, iters=4, eval_every=2),
                                 str(tmp_path / device))
    for a, b in zip(runs["cuda"], runs["cpu"]):
        rows_a, rows_b = RunDir(a).read_metrics(), RunDir(b).read_metrics()
        assert [r["iter"] for r in rows_a] == [r["iter"] for r in rows_b] == [0, 2, 4]
        for ra, rb in zip(rows_a, rows_b):
            for column in ("train_loss", "test_loss", "gm", "si_norm", "cos_prev", "proj_err"):
                assert ra[column] == pytest.approx(rb[column], rel=2e-4, abs=1e-7), (column, ra["iter"])
            for column in ("train_err", "test_err"):
                assert abs(ra[column] - rb[column]) <= 2 / 256, (column, ra["iter"])
