"""The GPU paths: solvers, boundary compression and `train` on CUDA agree with the CPU.

Skipped where PyTorch sees no GPU (CI has none); run on a GPU machine with
`python -m pytest tests/test_cuda.py`. TF32 is switched off so that CUDA's float32 matches the
CPU's to rounding; what remains (other summation orders in cuDNN and cuBLAS) is covered by the
tolerances below."""

from __future__ import annotations

import pytest
import torch

import geodnn
from geodnn.data import TensorBatches, class_weights
from geodnn.model import build_model
from geodnn.parallel.compress import CompressionSettings, ErrorFeedbackEncoder, decode
from geodnn.solvers import make_solver

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.fixture(autouse=True)
def exact_float32():
    kept = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = kept


def _data() -> TensorBatches:
    """Two bands of smooth noise; the positive class is where their blend is high."""
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.avg_pool2d(torch.randn(32, 2, 36, 36, generator=g), 5, 1)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0.3).long()
    y[:, :2, :] = 255  # an unlabeled strip: the ignore index on the GPU too
    return TensorBatches(x, y)


def _trained(solver_name: str, device: str, iterations: int) -> dict[str, torch.Tensor]:
    data = _data()
    model = build_model(2, 2, depth=4, width=8, seed=0)
    model.set_normalization(data.images.mean((0, 2, 3)), data.images.std((0, 2, 3)))
    model.to(device)
    weights = class_weights(data.labels, 2).tolist()
    settings = {"batch_size": 4, "slots": 4, "class_weights": weights}
    solver = make_solver(solver_name, model, data, settings, seed=0)
    losses = [solver.step()["loss"] for _ in range(iterations)]
    assert all(torch.isfinite(torch.tensor(losses)))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _relative_gap(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-12)) for k in b)


@pytest.mark.parametrize("solver", ["admm", "adam"])
def test_solver_on_the_gpu_matches_the_cpu(solver):
    on_gpu = _trained(solver, "cuda", 12)
    on_cpu = _trained(solver, "cpu", 12)
    moved = _relative_gap(on_cpu, _trained(solver, "cpu", 0))
    assert moved > 1e-3  # training moved the weights ...
    assert _relative_gap(on_gpu, on_cpu) < 1e-3  # ... the same way on both devices


def test_compression_with_error_feedback_on_gpu_tensors_and_after_a_restart():
    settings = CompressionSettings(bits=8)
    g = torch.Generator().manual_seed(1)
    messages = [torch.randn(2, 8, 12, 12, generator=g) for _ in range(3)]
    on_cpu = ErrorFeedbackEncoder(settings)
    expected = [on_cpu.encode(m, slot=0, generation=0) for m in messages]
    sender = ErrorFeedbackEncoder(settings)
    first = sender.encode(messages[0].cuda(), slot=0, generation=0)
    saved = {s: {**r, "error": r["error"].cuda()} for s, r in sender.state_dict().items()}
    restarted = ErrorFeedbackEncoder(settings)  # a rank's checkpoint loads onto its GPU
    restarted.load_state_dict(saved)
    rest = [restarted.encode(m.cuda(), slot=0, generation=0) for m in messages[1:]]
    for got, want in zip([first, *rest], expected):
        assert got.is_cuda and torch.equal(got.cpu(), want)  # encoded on the GPU, same bytes
        decoded = decode(got, messages[0].shape, settings)
        assert decoded.is_cuda and torch.equal(decoded.cpu(), decode(want, decoded.shape, settings))


@pytest.mark.parametrize("solver", ["admm", "adam"])
def test_train_on_the_gpu_resumes_and_matches_the_cpu(tmp_path, store, train_config, solver):
    from pipelines.train import train

    def run(device: str, folder: str, iterations: int = 6, resume: bool = False):
        config = train_config(store, solver, iterations, f'device = "{device}"\n')
        return train(config, tmp_path / folder, resume=resume, progress=False)

    gpu = run("cuda", "g")
    run("cuda", "r", iterations=3)
    resumed = run("cuda", "r", resume=True)
    cpu = run("cpu", "c")

    def weights(result):
        return geodnn.load_checkpoint(result.checkpoint).model.state_dict()

    assert _relative_gap(weights(resumed), weights(gpu)) < 1e-5
    assert _relative_gap(weights(gpu), weights(cpu)) < 1e-3
    assert [r.iteration for r in resumed.records] == [3, 6]
    assert abs(gpu.records[-1].val_loss - cpu.records[-1].val_loss) < 1e-3
    assert all(str(t.device) == "cpu" for t in weights(gpu).values())  # checkpoints load anywhere


def test_prediction_on_the_gpu_is_seam_free_and_matches_the_cpu(data_dir):
    """Chunks on the GPU against one whole-scene forward on the CPU: TF32 convolutions moved
    probabilities by ~1e-3 and flipped pixels near 0.5; prediction runs in full float32."""
    import numpy as np
    import rasterio

    from pipelines.predict import ModelPredictor, iter_predictions

    torch.backends.cudnn.allow_tf32 = True  # the default a user has; predict must not use it
    path = data_dir / "atlanta-buildings" / "image.tif"
    with rasterio.open(path) as src:
        scene = src.read(masked=True).astype(np.float32).filled(np.nan)
    model = build_model(scene.shape[0], 2, depth=8, width=16, seed=0)
    model.set_normalization(np.nanmean(scene, axis=(1, 2)), np.nanstd(scene, axis=(1, 2)))
    r = model.receptive_radius
    padded = np.pad(scene, ((0, 0), (r, r), (r, r)), mode="reflect")
    whole = ModelPredictor(model, "cpu")(padded[None])[0]
    valid = ~np.isnan(scene).all(axis=0)
    gap, flipped = 0.0, 0
    for p in iter_predictions(geodnn.Checkpoint(model), path, chunk=128, device="cuda"):
        w = p.window
        rows, cols = slice(w.row_off, w.row_off + w.height), slice(w.col_off, w.col_off + w.width)
        ok = valid[rows, cols]
        gap = max(gap, float(np.abs(p.probabilities - whole[:, rows, cols])[:, ok].max()))
        flipped += int((p.classes != whole[:, rows, cols].argmax(0))[ok].sum())
    assert torch.backends.cudnn.allow_tf32  # the user's setting is given back
    assert gap < 1e-5 and flipped == 0, (gap, flipped)


@pytest.fixture
def one_rank_env(monkeypatch):
    """torchrun's environment for a job of one rank on this machine."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_rank_solver_on_nccl_takes_a_cpu_model_to_its_gpu_and_profiles_there(one_rank_env):
    from geodnn.parallel.admm_rank import RankAdmmSolver, _proxy_model, profile_admm_layers
    from geodnn.parallel.group import rank_group
    from geodnn.solvers.admm import AdmmSettings

    data = _data()
    settings = {"batch_size": 4, "slots": 4, "class_weights": class_weights(data.labels, 2)}
    settings["class_weights"] = settings["class_weights"].tolist()
    with rank_group(timeout_s=60, backend="nccl") as ctx:
        model = build_model(2, 2, depth=4, width=8, seed=0)  # left on the CPU by the caller
        model.set_normalization(data.images.mean((0, 2, 3)), data.images.std((0, 2, 3)))
        solver = RankAdmmSolver(ctx, model, data, AdmmSettings.from_dict(settings), seed=0)
        for _ in range(12):
            solver.step()
        solver.settle()
        gathered = solver.gather_model()
        assert gathered.band_mean.is_cuda
        proxy, _ = _proxy_model(gathered)
        assert proxy.band_mean.is_cuda  # the balance is measured where the layers will run
        costs = profile_admm_layers(gathered, data, AdmmSettings.from_dict(settings), seed=0)
        assert len(costs) == len(gathered.layers) and all(c.seconds > 0 for c in costs)
    weights = {k: v.detach().cpu() for k, v in gathered.state_dict().items()}
    assert _relative_gap(weights, _trained("admm", "cuda", 12)) < 1e-4


def test_selfcheck_chain_reads_messages_that_arrive_on_the_gpu():
    from geodnn.parallel.exchange import BoundaryMessage
    from geodnn.parallel.selfcheck import ToyChain

    below = BoundaryMessage(1, 0, torch.randn(2, 3, 5, 4, generator=torch.Generator()))
    above = BoundaryMessage(1, 0, torch.randn(2, 3, 5, 4, generator=torch.Generator()))
    on_cpu, on_gpu = ToyChain(range(1, 2), 3), ToyChain(range(1, 2), 3)
    on_cpu.step(1, below, above)
    moved = [BoundaryMessage(m.slot, m.generation, m.tensor.cuda()) for m in (below, above)]
    on_gpu.step(1, *moved)
    assert torch.equal(on_gpu.state[1], on_cpu.state[1])


def test_adam_resumed_on_the_gpu_keeps_its_step_counters_on_the_cpu(tmp_path):
    from geodnn.checkpoint import atomic_torch_save, read_torch_file

    data = _data()
    model = build_model(2, 2, depth=4, width=8, seed=0).cuda()
    solver = make_solver("adam", model, data, {"batch_size": 4, "slots": 4}, seed=0)
    for _ in range(3):
        solver.step()
    atomic_torch_save(solver.state_dict(), tmp_path / "state.pt")
    saved = read_torch_file(tmp_path / "state.pt", "cuda")  # as a resumed run loads it
    resumed = make_solver("adam", build_model(2, 2, depth=4, width=8, seed=0).cuda(), data,
                          {"batch_size": 4, "slots": 4}, seed=0)  # fmt: skip
    resumed.load_state_dict(saved)
    steps = [s["step"] for s in resumed.optimizer.state.values()]
    assert steps and all(not s.is_cuda for s in steps)
    for one in (solver, resumed):
        one.step()
    for a, b in zip(solver.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # cuDNN may sum in other orders
