"""The trainer's CUDA-only paths, on a machine without a GPU: torch.cuda's answers monkeypatched,
or the helpers called on the CPU. bf16 only where the GPU has it natively, a retry after an
out-of-memory inside GradScaler.step, nvjpeg ordered after the step's work, an out-of-memory in GPU
decoding halving the micro-batch like one in the forward, DDP ranks that skip a near-empty batch
together, and the process group's set-up and tear-down."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torchvision.io
from PIL import Image
from torch import nn

import gpu_run.trainer.train as train_module
from gpu_run.trainer.train import (
    Batch,
    Faults,
    JpegBytes,
    SafeImageFolder,
    SkippedImages,
    StepContext,
    build_transforms,
    collate_skipping,
    gpu_batch,
)
from tests.conftest import events

CPU = torch.device("cpu")
# torchvision 0.29 deprecates decode_jpeg (for TorchCodec); the trainer imports it lazily.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")


def injected_oom() -> torch.cuda.OutOfMemoryError:
    return torch.cuda.OutOfMemoryError("injected: CUDA out of memory")


def fails_once(function):
    """`function`, except that its first call raises a CUDA out-of-memory."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise injected_oom()
        return function(*args, **kwargs)

    return wrapper


def tensor_batch(images: torch.Tensor | None, targets: torch.Tensor | None) -> Batch:
    """A Batch as the CPU-decoding loader gives it: tensors already."""
    indices = None if images is None else torch.arange(len(images))
    dataset = SimpleNamespace(decode="cpu", gpu_transform=None)
    return Batch((images, targets, indices, []), dataset, CPU, SkippedImages(Path("/")))


def cpu_context(micro_batch: int, scaler=None) -> StepContext:
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    return StepContext(CPU, None, scaler, micro_batch, False, Faults({}))


# ----------------------------------------------------------------------------------------------
# 1. bf16 only where the GPU computes it natively


@pytest.mark.parametrize("capability, dtype", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                               ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_bf16_only_from_compute_capability_8_else_fp16_with_a_scaler(monkeypatch, capability, dtype):
    # A T4 (7.5) or V100 (7.0) "supports" bf16 by emulation: is_bf16_supported() says yes there.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    scalers = []
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled=True: scalers.append((device, enabled)))
    gpu = torch.device("cuda", 1)
    amp_dtype, _ = train_module.pick_amp(gpu, "auto")
    assert amp_dtype == dtype and asked == [gpu]
    assert scalers == [("cuda", dtype is torch.float16)]  # fp16 scales its loss against underflow; bf16 needs not
    assert train_module.autocast_dtype(gpu, "off") is None and train_module.autocast_dtype(CPU, "auto") is None


# ----------------------------------------------------------------------------------------------
# 2. an out-of-memory inside GradScaler.step


def test_a_retry_after_an_out_of_memory_inside_the_scaler_step_unscales_its_gradients(capsys):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    reference = copy.deepcopy(model)
    images, targets = torch.randn(8, 4), torch.randint(0, 3, (8,))

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # The out-of-memory lands in optimizer.step(), after the scaler has unscaled the gradients.
    optimizer.step = fails_once(optimizer.step)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    ctx = cpu_context(8, scaler)
    loss_sum, correct, seen = train_module.train_step(model, nn.CrossEntropyLoss(), tensor_batch(images, targets),
                                                      ctx, optimizer)
    assert seen == 8 and ctx.micro_batch == 4
    assert [e["micro_batch"] for e in events(capsys.readouterr().out) if e["event"] == "oom"] == [4]

    # What one plain step on the same batch does: gradients as they are, not 1024 times them.
    plain = torch.optim.SGD(reference.parameters(), lr=0.1)
    nn.CrossEntropyLoss()(reference(images), targets).backward()
    plain.step()
    for got, want in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(got, want, atol=1e-6)
    assert scaler.get_scale() == 1024.0  # no inf was found: the scale stands


def test_forgetting_the_unscaled_state_leaves_a_disabled_scaler_alone():
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    train_module.forget_unscaled_gradients(torch.amp.GradScaler("cpu", enabled=False), optimizer)


# ----------------------------------------------------------------------------------------------
# 3. nvjpeg and the compute stream


def test_nvjpeg_decodes_only_after_the_compute_stream_has_drained(monkeypatch):
    order = []

    class Stream:
        def synchronize(self):
            order.append("synchronize")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: order.append(("stream", device)) or Stream())

    def decode_jpeg(data, mode, device):
        order.append("decode")
        return [torch.zeros(3, 2, 2, dtype=torch.uint8) for _ in data]

    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode_jpeg)
    gpu = torch.device("cuda", 0)
    jpeg = JpegBytes(torch.zeros(8, dtype=torch.uint8), 1)
    assert len(train_module.nvjpeg([jpeg, jpeg], gpu)) == 2
    assert order == [("stream", gpu), "synchronize", "decode"]
    order.clear()
    train_module.nvjpeg([jpeg], CPU)  # no CUDA stream to wait for
    assert order == ["decode"]


# ----------------------------------------------------------------------------------------------
# 4. out of memory on the GPU decode path


@pytest.fixture
def jpeg_folder(tmp_path) -> SafeImageFolder:
    """Six readable JPEGs in two classes, read for the GPU path (the workers only read files)."""
    for i in range(6):
        path = tmp_path / "train" / "ab"[i % 2] / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 40), (40 * i, 200 - 30 * i, 90)).save(path, "JPEG")
    train_tf, _ = build_transforms(32)
    images = SafeImageFolder(tmp_path / "train", ["a", "b"], train_tf, seed=3)
    images.decode = "gpu"
    return images


def loaded(images: SafeImageFolder) -> tuple:
    return collate_skipping([images[(i, 1)] for i in range(len(images))])


def test_an_out_of_memory_in_nvjpeg_is_raised_not_decoded_again_on_the_cpu(jpeg_folder, monkeypatch):
    def out_of_memory(jpegs, device):
        raise injected_oom()

    monkeypatch.setattr(train_module, "nvjpeg", out_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        gpu_batch(loaded(jpeg_folder), jpeg_folder.gpu_transform, CPU)


def test_an_out_of_memory_copying_a_cpu_decoded_image_is_raised_not_taken_for_an_unreadable_file(
        jpeg_folder, monkeypatch):
    def unsupported(jpegs, device):
        raise RuntimeError("nvjpeg: unsupported")  # the CPU decodes these instead

    class OutOfMemoryOnCopy:
        def to(self, device):
            raise injected_oom()

    monkeypatch.setattr(train_module, "nvjpeg", unsupported)
    monkeypatch.setattr(train_module, "pil_to_tensor", lambda image: OutOfMemoryOnCopy())
    with pytest.raises(torch.cuda.OutOfMemoryError):
        gpu_batch(loaded(jpeg_folder), jpeg_folder.gpu_transform, CPU)


@pytest.mark.parametrize("where", ["nvjpeg", "transform"])
def test_an_out_of_memory_decoding_the_batch_halves_the_micro_batch_and_skips_no_image(
        jpeg_folder, monkeypatch, capsys, where):
    batch_of = loaded(jpeg_folder)
    expected = gpu_batch(batch_of, jpeg_folder.gpu_transform, CPU)[0]  # decoded with nothing failing
    if where == "nvjpeg":
        monkeypatch.setattr(train_module, "nvjpeg", fails_once(train_module.nvjpeg))
    else:
        jpeg_folder.gpu_transform = fails_once(jpeg_folder.gpu_transform)
    skipped = SkippedImages(jpeg_folder.root)
    batch = Batch(batch_of, jpeg_folder, CPU, skipped)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2))
    ctx = cpu_context(6)
    trained = train_module.train_step(model, nn.CrossEntropyLoss(), batch, ctx, torch.optim.SGD(model.parameters(), 0.1))

    assert trained is not None and trained[2] == 6  # every image trained
    assert ctx.micro_batch == 3 and skipped.paths == set()
    evs = events(capsys.readouterr().out)
    assert [e["event"] for e in evs] == ["oom"] and evs[0]["micro_batch"] == 3
    assert torch.equal(batch.images, expected)  # decoded again, with the same seeds: the same crops


def test_the_decode_chunk_follows_the_micro_batch():
    assert [train_module.decode_chunk(m) for m in (256, 32, 16, 1)] == [32, 32, 16, 1]


def test_alone_a_batch_with_fewer_than_two_images_is_skipped_as_before():
    model = nn.Linear(4, 3)
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for batch in (tensor_batch(torch.randn(1, 4), torch.tensor([0])), tensor_batch(None, None)):
        assert train_module.train_step(model, nn.CrossEntropyLoss(), batch, cpu_context(4), optimizer) is None
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())


# ----------------------------------------------------------------------------------------------
# 5. DDP: a rank with a near-empty batch, and an out-of-memory decoding on one rank

RANK = textwrap.dedent("""
    import datetime, json, sys
    import torch, torch.distributed as dist
    from pathlib import Path
    from types import SimpleNamespace
    from torch import nn
    import gpu_run.trainer.train as t

    rank, store = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=20))
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Linear(4, 3), broadcast_buffers=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ctx = t.StepContext(torch.device("cpu"), None, torch.amp.GradScaler("cpu", enabled=False), 4, False,
                        t.Faults({}, rank))
    dataset = SimpleNamespace(decode="cpu", gpu_transform=None)
    skipped = t.SkippedImages(Path("/"))
    g = torch.Generator().manual_seed(rank)

    class DecodeRunsOutOfMemory(t.Batch):
        failed = False

        def tensors(self, chunk):
            if not self.failed:
                self.failed = True
                raise torch.cuda.OutOfMemoryError("injected")
            return super().tensors(chunk)

    def batch(n, kind=t.Batch):
        images = torch.randn(n, 4, generator=g) if n else None
        targets = torch.randint(0, 3, (n,), generator=g) if n else None
        return kind((images, targets, None if images is None else torch.arange(n), []), dataset,
                    torch.device("cpu"), skipped)

    # Step 2: rank 1 has one readable image; step 3: none. Step 5: rank 1 runs out of memory decoding.
    plan = {0: [batch(4), batch(4), batch(4), batch(4), batch(4)],
            1: [batch(4), batch(1), batch(0), batch(4), batch(4, DecodeRunsOutOfMemory)]}[rank]
    trained = []
    for b in plan:
        done = t.train_step(model, nn.CrossEntropyLoss(), b, ctx, optimizer)
        trained.append(None if done is None else done[2])
    step, stopped = t.train_one_epoch(model, nn.CrossEntropyLoss(), optimizer, iter([batch(4), batch(rank)]), ctx,
                                      t.EpochTotals(torch.device("cpu"), 2), 0, 0, 2, 1, t.StopFlag())
    print(json.dumps({"rank": rank, "trained": trained, "micro_batch": ctx.micro_batch, "epoch": [step, stopped],
                      "weights": [p.detach().flatten().tolist() for p in model.parameters()]}), flush=True)
    dist.barrier()  # neither rank tears gloo down while the other still talks to it
    dist.destroy_process_group()
""")


def test_ddp_ranks_skip_a_near_empty_batch_together_and_halve_together(tmp_path):
    store = tmp_path / "store"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(rank), str(store)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for rank in range(2)]
    try:
        outputs = [rank.communicate(timeout=60) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    assert [rank.returncode for rank in ranks] == [0, 0], "\n".join(err[-2000:] for _out, err in outputs)
    results = [json.loads(out.splitlines()[-1]) for out, _err in outputs]
    # Steps 2 and 3 are skipped by both ranks (rank 0's four images too): the others never wait in
    # a collective that rank 1 does not enter.
    assert [r["trained"] for r in results] == [[4, None, None, 4, 4]] * 2
    oom = [e for e in events(outputs[0][0]) if e.get("event") == "oom"]  # only rank 0 speaks
    assert [(e["micro_batch"], e["ranks"]) for e in oom] == [(2, [1])] and [r["micro_batch"] for r in results] == [2, 2]
    assert [r["epoch"] for r in results] == [[2, False]] * 2  # the loop too: its second batch is empty on rank 0
    assert results[0]["weights"] == results[1]["weights"]  # every step trained was trained by both


# ----------------------------------------------------------------------------------------------
# 6. process group, compile, tear-down, evaluation


@pytest.fixture
def two_ranks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("GPU_RUN_DIST_TIMEOUT_S", raising=False)
    monkeypatch.setattr(dist, "get_rank", lambda *a: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_the_nccl_process_group_is_bound_to_the_ranks_gpu(two_ranks, monkeypatch):
    calls = []
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend=None, timeout=None, device_id=None: calls.append((backend, device_id)))
    assert train_module.setup_distributed("auto") == (1, 2, 1)
    assert train_module.setup_distributed("cpu") == (1, 2, 1)
    assert calls == [("nccl", torch.device("cuda", 1)), ("gloo", None)]


def test_a_torch_without_device_id_is_not_passed_one(two_ranks, monkeypatch):
    calls = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend=None, timeout=None: calls.append(backend))
    assert train_module.setup_distributed("auto") == (1, 2, 1)
    assert calls == ["nccl"]


def test_compile_wraps_the_ddp_model_not_the_other_way_round(monkeypatch):
    class FakeDDP(nn.Module):
        def __init__(self, module, **options):
            super().__init__()
            self.module = module

    class Compiled:
        def __init__(self, model):
            self._orig_mod = model

    monkeypatch.setattr(nn.parallel, "DistributedDataParallel", FakeDDP)
    monkeypatch.setattr(torch, "compile", Compiled)
    plain = nn.Linear(2, 2)
    model = train_module.wrap_model(plain, 2, CPU, 0, compile_model=True)
    assert isinstance(model, Compiled) and isinstance(model._orig_mod, FakeDDP) and model._orig_mod.module is plain
    assert train_module.ddp_module(model) is model._orig_mod  # found under compile's wrapper to reset it
    assert train_module.wrap_model(plain, 1, CPU, 0, compile_model=False) is plain


def test_the_process_group_is_destroyed_however_main_ends(monkeypatch):
    destroyed = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda *a: 0)
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a: destroyed.append(True))
    argv = ["--data", "d", "--out", "o"]

    def crash(args):
        raise RuntimeError("not a TrainerError")

    monkeypatch.setattr(train_module, "main", crash)
    with pytest.raises(RuntimeError):
        train_module.run(argv)

    def user_error(args):
        raise train_module.TrainerError("a problem the user can fix")

    monkeypatch.setattr(train_module, "main", user_error)
    assert train_module.run(argv) == train_module.EXIT_ERROR
    assert destroyed == [True, True]


def test_evaluation_runs_in_the_micro_batches_an_out_of_memory_left(tmp_path):
    sizes = []

    class Recording(nn.Linear):
        def forward(self, x):
            sizes.append(len(x))
            return super().forward(x)

    torch.manual_seed(0)
    model = Recording(4, 3)
    images, targets = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    dataset = SimpleNamespace(root=tmp_path / "val", samples=[(str(tmp_path / "val" / "a" / f"{i}.jpg"), 0) for i in range(5)])
    whole, _ = train_module.evaluate(model, nn.CrossEntropyLoss(), [tensor_batch(images, targets)], cpu_context(5), dataset)
    assert sizes == [5]
    sizes.clear()
    halved, rows = train_module.evaluate(model, nn.CrossEntropyLoss(), [tensor_batch(images, targets)], cpu_context(2),
                                         dataset)
    assert sizes == [2, 2, 1]
    assert halved["val_images"] == 5 and abs(halved["val_loss"] - whole["val_loss"]) < 1e-6
    assert [row[0] for row in rows] == [f"val/a/{i}.jpg" for i in range(5)] and [row[1] for row in rows] == targets.tolist()
