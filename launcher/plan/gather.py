"""The I/O around the estimate: count the dataset, measure decoding on a sample of it here, read
this user's past runs from the ledger and their run folders, and what each host's settings and
`gpu-run doctor` say. Everything it finds goes to estimate.py as Figures with their sources.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, cast

from gpu_run import host_facts
from gpu_run.cache import AUTO, CacheAdvice, advise_cache, cache_root, spread
from gpu_run.config import Config, Host
from gpu_run.dataset import check_layout, dataset_id
from gpu_run.errors import ConfigError
from gpu_run.events import parse_event, read_metrics
from gpu_run.ledger import Ledger, RunRecord
from gpu_run.model_zoo import CLASSIFICATION_MODELS
from gpu_run.paths import home_dir
from gpu_run.plan import tables
from gpu_run.plan.estimate import (
    ASSUMED,
    CONFIG,
    DOCTOR,
    MEASURED_HERE,
    PAST_RUN,
    RECHECK_S,
    DecodeRates,
    Fact,
    Figure,
    HostInput,
    Job,
    PastRun,
    Row,
    Upload,
    parse_duration,
    plan,
)
from gpu_run.ui import UI

SAMPLE_IMAGES = 48  # images decoded per measurement: enough for a steady rate, a few seconds at most
COPY_SAMPLE = 16  # images resized as --cache-size would, for the copy's bytes and decode speed
MEASURE_BUDGET_S = 2.0  # and never longer than this per pass (half of it for the val images)
MIN_UPLINK_BYTES = 20e6  # a sync smaller than this measures latency, not the uplink
PAST_RUNS_READ = 50
PLANS_FILE = "plans.jsonl"
UPLINK_FILE = "uplink.json"


@dataclass(frozen=True)
class PlanRequest:
    data: Path
    model: str
    epochs: int
    image_size: int
    batch_size: int
    cache_size: int | Literal["auto"] = 0  # a short side, 0 for none, or "auto" (the cache module decides)
    augment: str = "standard"
    deadline: str | None = None
    budget: float | None = None
    uplink_mbit: float | None = None
    hosts: tuple[str, ...] = ()
    measure: bool = True  # False: no decode or CPU measurement here (faster, fewer figures)


@dataclass
class RunFacts:
    """What one finished past run tells about its host."""

    record: RunRecord
    model: str
    image_size: int
    cache_size: int
    device: str | None  # gpu | cpu
    device_name: str | None
    workers: int | None
    train_images_per_s: float | None
    eval_images_per_s: float | None
    phase_s: dict[str, float]  # phase -> seconds (ok phases only)
    startup_s: float | None  # the train phase less the epochs: the trainer's start and end
    epoch_overhead_s: float = 0.0  # per epoch, beyond training and evaluation: checkpoints, predictions


# The request ------------------------------------------------------------------------------------


def check_request(req: PlanRequest) -> float | None:
    """Refuse what cannot be planned, in one line with the fix; returns the deadline in seconds."""
    for name, value in (("--epochs", req.epochs), ("--batch-size", req.batch_size)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if req.image_size < 32:
        raise ConfigError(f"--image-size must be at least 32 pixels, got {req.image_size}")
    if req.cache_size != AUTO:
        size = cast(int, req.cache_size)  # a short side, not auto
        if size < 0 or (size and size < req.image_size):
            raise ConfigError(
                f"--cache-size must be 0 (none), auto, or at least --image-size {req.image_size}, got {req.cache_size}"
            )
    if req.budget is not None and not (req.budget >= 0 and req.budget != float("inf")):
        raise ConfigError(f"--budget must be an amount >= 0 in the hosts' currency, got {req.budget}")
    if req.uplink_mbit is not None and not (0 < req.uplink_mbit < float("inf")):
        raise ConfigError(f"--uplink must be your upload speed in Mbit/s (> 0), got {req.uplink_mbit}")
    if req.deadline is None:
        return None
    try:
        return parse_duration(req.deadline)
    except ValueError:
        raise ConfigError(f"--deadline {req.deadline!r}: write a duration such as 6h, 90m, 1h30m or 2d") from None


def count_dataset(data: Path, req: PlanRequest) -> tuple[Job, str, Path]:
    """The Job (image counts and bytes) and the dataset id; refuses a folder that is not ImageFolder."""
    root = Path(data).expanduser().resolve()
    _classes, files = check_layout(root)
    train = sum(len(v) for v in files["train"].values())
    val = sum(len(v) for v in files["val"].values())
    source = root
    if req.cache_size:
        copy = cache_root(root, req.cache_size)
        source = copy if (copy / ".gpu-run-cache.json").is_file() else root
    job = Job(
        model=req.model,
        epochs=req.epochs,
        image_size=req.image_size,
        batch_size=req.batch_size,
        train_images=train,
        val_images=val,
        dataset_bytes=folder_bytes(source),
        cache_size=req.cache_size,
    )
    return job, dataset_id(root), source


def folder_bytes(root: Path) -> int:
    """What the sync sends: every regular file, hidden names left out."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                try:
                    total += os.stat(os.path.join(dirpath, name)).st_size
                except OSError:
                    pass
    return total


# Measurements here ------------------------------------------------------------------------------


def _per_core_rate(dataset, budget_s: float) -> float:
    """Images/s one core gets through the trainer's own dataset code (read, decode, transform)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a loader worker
    try:
        dataset[(0, 0)]  # warm up: first-call imports and allocations are not per image
        start, done = time.perf_counter(), 0
        for i in range(len(dataset)):
            dataset[(i, 0)]
            done += 1
            if time.perf_counter() - start > budget_s:
                break
        return done / max(time.perf_counter() - start, 1e-9)
    finally:
        torch.set_num_threads(threads)


def measure_decode(
    root: Path, image_size: int, augment: str = "standard", cache_size: int = 0, advice: CacheAdvice | None = None
) -> DecodeRates:
    """Decode-and-augment speed of one core here, on a sample of the user's images, through the
    trainer's own ImageFolder and transforms (JPEGs decoded at the reduced scale it asks for).

    With `cache_size`, the rates are those of the copy the run will train on (the cached copy if it
    is made, else copies of a few sampled images made by the cache's own resize). Otherwise the copy
    to suggest is the cache module's advice (`advise_cache`: what training reads, 915 px at 224
    with --augment standard, when the images are over twice that): its measured speed-up and size
    are applied to the rates measured here."""
    from gpu_run.trainer.train import SafeImageFolder, build_transforms, decode_short_side

    classes, _ = check_layout(root)
    train_tf, eval_tf = build_transforms(image_size, augment)

    def rates(split_root: Path) -> tuple[float, float]:
        # As the trainer's main builds them.
        train = SafeImageFolder(split_root / "train", classes, train_tf, min_short_side=decode_short_side(train_tf))
        val = SafeImageFolder(split_root / "val", classes, eval_tf, min_short_side=decode_short_side(eval_tf))
        train.samples, val.samples = spread(train.samples, SAMPLE_IMAGES), spread(val.samples, SAMPLE_IMAGES // 2)
        return _per_core_rate(train, MEASURE_BUDGET_S), _per_core_rate(val, MEASURE_BUDGET_S / 2)

    if cache_size:
        made = cache_root(root, cache_size)
        if (made / ".gpu-run-cache.json").is_file():
            train, val = rates(made)
            return DecodeRates(
                train, val, f"(measured here on your --cache-size {cache_size} copy)", cache_size=cache_size
            )
        with tempfile.TemporaryDirectory(prefix="gpu-run-plan-") as tmp:
            ratio = copyspread(root, classes, Path(tmp), cache_size)
            train, val = rates(Path(tmp))
        return DecodeRates(
            train,
            val,
            f"(measured here on a sample of your images resized to {cache_size} px)",
            cache_size=cache_size,
            cache_bytes_ratio=ratio,
        )
    train, val = rates(root)
    detail = "(measured here on a sample of your images)"
    if advice is None or not advice.helps or not advice.decode_speedup or advice.bytes_ratio is None:
        return DecodeRates(train, val, detail)
    speedup = advice.decode_speedup
    cached = DecodeRates(
        train * speedup,
        val * speedup,
        f"(x{speedup:.1f}: the sample resized to {advice.cache_size} px decodes that much faster here)",
    )
    return DecodeRates(
        train, val, detail, cached=cached, cache_size=advice.cache_size, cache_bytes_ratio=advice.bytes_ratio
    )


def copyspread(root: Path, classes: list[str], dest: Path, size: int) -> float:
    """Copies of a few images spread over train and val (and the classes) as --cache-size makes
    them, under dest; returns their bytes over the originals'."""
    from gpu_run.cache import resize_one
    from gpu_run.trainer.train import list_samples

    picked = [
        path
        for split, n in (("train", COPY_SAMPLE * 3 // 4), ("val", COPY_SAMPLE // 4))
        for path, _ in spread(list_samples(root / split, classes), n)
    ]
    original, copied, start = 0, 0, time.perf_counter()
    for i, path in enumerate(picked):
        if i >= 4 and time.perf_counter() - start > MEASURE_BUDGET_S:  # a 12 MP photo takes a tenth of a second
            break
        if resize_one((path, str(dest / Path(path).relative_to(root)), size)):
            original += os.path.getsize(path)
            copied += os.path.getsize(dest / Path(path).relative_to(root))
    return copied / original if original else 1.0


def measure_cpu_training(model: str, image_size: int, batch_size: int, classes: int) -> float:
    """Training images/s of the model on this machine's CPU: a few optimizer steps on random
    images (data loading is added separately, from the decode measurement)."""
    import torch
    import torchvision

    net = torchvision.models.get_model(model, weights=None, num_classes=classes)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    batch = min(batch_size, 32)  # the trainer's batch: small batches run less efficiently on a CPU
    x = torch.randn(batch, 3, image_size, image_size)
    y = torch.randint(0, classes, (batch,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()

    net.train()
    start = time.perf_counter()
    step()  # warm-up; when one step is already longer than the budget, it is the measurement
    warm_s = time.perf_counter() - start
    if warm_s > MEASURE_BUDGET_S:
        return batch / warm_s
    start, steps = time.perf_counter(), 0
    while steps < 1 or (time.perf_counter() - start < MEASURE_BUDGET_S and steps < 20):
        step()
        steps += 1
    return steps * batch / (time.perf_counter() - start)


def model_gflops(model: str) -> float | None:
    """GFLOPs at 224 px of a model missing from the shipped table, from torchvision's metadata."""
    if model in tables.GFLOPS_224:
        return tables.GFLOPS_224[model]
    try:
        from torchvision.models import get_model_weights

        weights = get_model_weights(model).DEFAULT
        crop = getattr(weights.transforms(), "crop_size", [224])[0]
        return weights.meta["_ops"] * (224 / crop) ** 2
    except Exception:  # not a torchvision model, or no metadata: the estimate says it has none
        return None


# Past runs --------------------------------------------------------------------------------------


def trainer_events(run_dir: Path) -> tuple[dict, list[dict]]:
    """The trainer's start event and its epoch events, from the run's train.log."""
    start: dict = {}
    epochs: list[dict] = []
    try:
        with open(run_dir / "train.log", errors="replace") as f:
            for line in f:
                event = parse_event(line)
                if event and event["event"] == "start" and not start:
                    start = event
                elif event and event["event"] == "epoch":
                    epochs.append(event)
    except OSError:
        pass
    return start, epochs


def _whole(value) -> int:
    """A recorded --cache-size: its pixels, 0 for none (or for anything not a number)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _eval_s(m: dict) -> float:
    return m.get("val_images", 0) / m["eval_images_per_s"] if m.get("eval_images_per_s") else 0.0


def run_facts(ledger: Ledger, run: RunRecord) -> RunFacts | None:
    """What a finished run measured, from its metrics.jsonl, train.log and the ledger's phases."""
    if run.status not in ("succeeded", "stopped") or not run.run_dir or run.resumed_from:
        return None
    run_dir = Path(run.run_dir)
    try:
        metrics = read_metrics((run_dir / "metrics.jsonl").read_text())
    except (OSError, ValueError, KeyError):
        return None
    if not metrics:
        return None
    spec = run.args.get("spec", {})
    start, epoch_events = trainer_events(run_dir)
    phases: dict[str, float] = {}
    for p in ledger.phases(run.run_id):
        if p.status == "ok" and p.duration_s is not None:
            phases[p.phase] = phases.get(p.phase, 0.0) + p.duration_s
    train_rates = [m["train_images_per_s"] for m in metrics if m.get("train_images_per_s")]
    eval_rates = [m["eval_images_per_s"] for m in metrics if m.get("eval_images_per_s")]
    # An epoch's wall time, between the trainer's events (the host's own clock), is its training
    # and evaluation plus what the trainer does after them: checkpoints, predictions, metrics.
    walls = (
        [b["time"] - a["time"] for a, b in zip([start, *epoch_events], epoch_events) if a.get("time") and b.get("time")]
        if start
        else []
    )
    by_epoch = {m["epoch"]: m for m in metrics}
    overheads = [
        max(0.0, w - by_epoch[e["epoch"]].get("epoch_time_s", 0.0) - _eval_s(by_epoch[e["epoch"]]))
        for w, e in zip(walls, epoch_events)
        if e.get("epoch") in by_epoch
    ]
    overhead = statistics.median(overheads) if overheads else 0.0
    startup = None
    if "train" in phases:
        epochs_s = sum(m.get("epoch_time_s", 0.0) + _eval_s(m) + overhead for m in metrics)
        startup = max(0.0, phases["train"] - epochs_s)
    device = (run.summary.get("device") or "").lower() or None
    if start.get("device"):
        device = "gpu" if str(start["device"]).startswith("cuda") else "cpu"
    return RunFacts(
        record=run,
        model=run.model or spec.get("model", ""),
        image_size=int(spec.get("image_size", 224)),
        cache_size=_whole(spec.get("cache_size")),
        device=device,
        device_name=start.get("device_name") if device == "gpu" else None,
        workers=start.get("workers"),
        train_images_per_s=statistics.median(train_rates) if train_rates else None,
        eval_images_per_s=statistics.median(eval_rates) if eval_rates else None,
        phase_s=phases,
        startup_s=startup,
        epoch_overhead_s=overhead,
    )


def past_runs(ledger: Ledger) -> dict[str, list[RunFacts]]:
    """host -> its finished runs, newest first."""
    out: dict[str, list[RunFacts]] = {}
    for run in ledger.list_runs(limit=PAST_RUNS_READ * 4):
        facts = run_facts(ledger, run)
        if facts is not None and len(out.setdefault(run.host, [])) < PAST_RUNS_READ:
            out[run.host].append(facts)
    return out


def _median_figure(values: list[tuple[float, str]], what: str) -> Figure | None:
    if not values:
        return None
    ids = ", ".join(run_id for _, run_id in values[:3]) + (" ..." if len(values) > 3 else "")
    return Figure(statistics.median(v for v, _ in values), PAST_RUN, f"{what}, median of run(s) {ids}")


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.localtime(ts))


# Hosts ------------------------------------------------------------------------------------------


def gpu_fact(host: Host, runs: list[RunFacts], facts: dict, local_gpu: str | None) -> Fact:
    if host.gpu:
        if host.gpu.strip().lower() in ("none", "cpu"):
            return Fact(None, CONFIG, f'gpu = "{host.gpu}"')
        return Fact(host.gpu, CONFIG, f'gpu = "{host.gpu}" in [hosts.{host.name}]')
    if host.kind == "aws" and host.instance_type:
        gpu, _ = tables.aws_instance_facts(host.instance_type)
        if gpu:
            return Fact(gpu, tables.AWS_SOURCE, f"instance_type {host.instance_type}")
    if facts.get("checked_at"):
        when = _when(facts["checked_at"])
        if facts.get("gpu"):
            return Fact(facts["gpu"], DOCTOR, f"`gpu-run doctor` found it on {when}")
        return Fact(None, DOCTOR, f"`gpu-run doctor` found no GPU on {when}")
    for r in runs:
        if r.device == "gpu" and r.device_name:
            return Fact(r.device_name, PAST_RUN, f"run {r.record.run_id} trained on it")
        if r.device == "cpu":
            return Fact(None, PAST_RUN, f"run {r.record.run_id} trained on the CPU")
    if host.is_local:
        return Fact(local_gpu, MEASURED_HERE, "this machine" + ("" if local_gpu else " has no CUDA GPU"))
    return Fact(None, ASSUMED, "not known")


def vcpus_figure(host: Host, runs: list[RunFacts], facts: dict) -> Figure | None:
    if host.vcpus:
        return Figure(host.vcpus, CONFIG, f"vcpus = {host.vcpus}")
    if host.kind == "aws" and host.instance_type:
        _, vcpus = tables.aws_instance_facts(host.instance_type)
        if vcpus:
            return Figure(vcpus, tables.AWS_SOURCE, host.instance_type)
    if facts.get("vcpus"):
        return Figure(facts["vcpus"], DOCTOR, f"`gpu-run doctor`, {_when(facts['checked_at'])}")
    if host.is_local:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return Figure(cores, MEASURED_HERE, "this machine")
    for r in runs:
        if r.workers is not None and 0 < r.workers < 8:
            return Figure(r.workers + 1, PAST_RUN, f"run {r.record.run_id} used {r.workers} loader workers")
    return None


def upload_for(
    host: Host,
    runs: list[RunFacts],
    all_runs: dict[str, list[RunFacts]],
    data_id: str,
    cache_size: int,
    uplink_mbit: float | None,
    asked: Callable[[], Figure | None],
) -> Upload:
    if host.is_local:
        return Upload(already="local: no upload", recheck_s=Figure(0.0, CONFIG, ""))
    same = [r for r in runs if r.record.dataset_id == data_id and r.cache_size == cache_size and "sync" in r.phase_s]
    if same:
        first = same[-1]
        rechecks = [(r.phase_s["sync"], r.record.run_id) for r in same[:-1]]
        recheck = _median_figure(rechecks, "the no-change sync")
        if recheck is None and first.phase_s["sync"] < RECHECK_S:
            # Listing what is there never takes longer than the first sync, which sent it all.
            recheck = Figure(
                first.phase_s["sync"], PAST_RUN, f"no longer than the first sync, run {first.record.run_id}"
            )
        return Upload(
            already=f"already on the host (synced by run {first.record.run_id} on {_when(first.record.created_at)})",
            recheck_s=recheck,
        )
    if uplink_mbit:
        return Upload(uplink_mbit=Figure(uplink_mbit, "--uplink", "as you said"))
    measured = measured_uplink(runs) or next(
        (m for name, rs in all_runs.items() if name != host.name for m in [measured_uplink(rs)] if m), None
    )
    return Upload(uplink_mbit=measured or asked())


def measured_uplink(runs: list[RunFacts]) -> Figure | None:
    """Mbit/s of the newest first sync of a dataset whose folder is still here to weigh."""
    for i, r in enumerate(runs):
        if "sync" not in r.phase_s or not r.record.data_path or r.record.dataset_id is None:
            continue
        earlier = [
            o for o in runs[i + 1 :] if o.record.dataset_id == r.record.dataset_id and o.cache_size == r.cache_size
        ]
        if earlier:  # not the first sync of that data: it moved only the changes
            continue
        root = Path(r.record.data_path)
        if r.cache_size:
            root = cache_root(root, r.cache_size)
        size = folder_bytes(root) if root.is_dir() else 0
        if size >= MIN_UPLINK_BYTES and r.phase_s["sync"] > 0:
            mbit = size * 8 / r.phase_s["sync"] / 1e6
            return Figure(
                mbit,
                PAST_RUN,
                f"run {r.record.run_id} sent {size / 1e6:,.0f} MB to {r.record.host} in {r.phase_s['sync']:.0f} s",
            )
    return None


def host_input(
    host: Host,
    job: Job,
    runs: list[RunFacts],
    all_runs: dict[str, list[RunFacts]],
    data_id: str,
    req: PlanRequest,
    local_gpu: str | None,
    asked: Callable[[], Figure | None],
    cpu_rate: Callable[[], Figure | None],
) -> HostInput:
    facts = host_facts.load(host.name)
    gpu = gpu_fact(host, runs, facts, local_gpu)
    speed_runs = [r for r in runs if r.train_images_per_s and r.device == ("gpu" if gpu.value else "cpu")]
    same_model = [r for r in speed_runs if r.model == job.model]
    chosen = (same_model or ([] if gpu.value else speed_runs))[:1]
    past = None
    if chosen:
        r = chosen[0]
        past = PastRun(
            r.record.run_id,
            r.model,
            r.image_size,
            r.device,
            r.train_images_per_s,
            r.eval_images_per_s,
            r.epoch_overhead_s,
        )
    setups = [
        (r.phase_s.get("connect", 0) + r.phase_s["build"], r.record.run_id) for r in runs[:5] if "build" in r.phase_s
    ]
    finishes = [
        (r.phase_s["pull"] + r.phase_s.get("stop", 0), r.record.run_id) for r in runs[:5] if "pull" in r.phase_s
    ]
    starts = [(r.startup_s, r.record.run_id) for r in runs[:5] if r.startup_s is not None]
    setup = (
        Figure(
            min(v for v, _ in setups),
            PAST_RUN,
            f"connect and image, fastest of run(s) {', '.join(i for _, i in setups[:3])}",
        )
        if setups
        else None
    )
    return HostInput(
        name=host.name,
        kind=host.kind,
        price_per_hour=host.price_per_hour,
        currency=host.currency,
        billing=host.billing,
        min_billed_s=host.min_billed_s,
        gpu=gpu,
        vcpus=vcpus_figure(host, runs, facts),
        upload=upload_for(host, runs, all_runs, data_id, job.cache_size, req.uplink_mbit, asked),
        setup_s=setup,
        finish_s=_median_figure(finishes, "pull and stop"),
        startup_s=_median_figure(starts, "the trainer's start and end"),
        past=past,
        cpu_rate=cpu_rate() if host.is_local and not gpu.value and past is None else None,
    )


# Uplink asked once ------------------------------------------------------------------------------


def stored_uplink() -> Figure | None:
    try:
        data = json.loads((home_dir() / UPLINK_FILE).read_text())
        return Figure(float(data["mbit"]), "you said", f"on {_when(data['at'])} (--uplink changes it)")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store_uplink(mbit: float) -> None:
    (home_dir() / UPLINK_FILE).write_text(json.dumps({"mbit": mbit, "at": time.time()}) + "\n")


# The plan ---------------------------------------------------------------------------------------


def make_plan(
    req: PlanRequest, config: Config, ledger: Ledger, ui: UI, ask_uplink: Callable[[], float | None] | None = None
) -> tuple[list[Row], Job]:
    """Every configured host's row (or those asked for), best first."""
    deadline_s = check_request(req)
    names = list(req.hosts) or list(config.hosts)
    hosts = [config.host(n) for n in names]
    root = Path(req.data).expanduser().resolve()
    check_layout(root)  # a folder that is not ImageFolder is refused before anything is timed
    advice = None
    if req.cache_size == AUTO or (req.measure and not req.cache_size):
        with ui.spinner("sampling the images for a resized copy"):
            advice = advise_cache(root, req.image_size, req.augment, measure=req.measure)
    if req.cache_size == AUTO:  # as train decides it
        assert advice is not None  # advised above for auto
        req = replace(req, cache_size=advice.cache_size)
        if advice.cache_size:
            ui.info(f"planned for the copy --cache-size auto makes: {advice.message}")
    job, data_id, data_root = count_dataset(root, req)
    if req.model not in CLASSIFICATION_MODELS:
        raise ConfigError(
            f"unknown --model {req.model!r}; choose a torchvision classification model such as "
            f"resnet18, resnet50, mobilenet_v3_large, efficientnet_b0 or vit_b_16"
        )
    gflops = model_gflops(req.model)
    all_runs = past_runs(ledger)

    decode = None
    if req.measure:
        with ui.spinner(f"measuring image decoding on a sample of {req.data}"):
            decode = measure_decode(root, req.image_size, req.augment, int(req.cache_size), advice)
        if data_root == root and req.cache_size:  # the copy is not made yet: its bytes, from the sample's
            job = replace(job, dataset_bytes=int(job.dataset_bytes * decode.cache_bytes_ratio))
    local_gpu = None
    if any(h.is_local for h in hosts):
        import torch

        local_gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None

    asked_cache: list = []

    def asked() -> Figure | None:
        if not asked_cache:
            figure = stored_uplink()
            if figure is None and ask_uplink is not None:
                mbit = ask_uplink()
                if mbit:
                    store_uplink(mbit)
                    figure = Figure(mbit, "you said", "just now (--uplink changes it)")
            asked_cache.append(figure)
        return asked_cache[0]

    def cpu_rate() -> Figure | None:
        if not req.measure:
            return None
        classes = len(check_layout(root)[0])
        with ui.spinner(f"measuring {req.model} training steps on this machine's CPU"):
            compute = measure_cpu_training(req.model, req.image_size, req.batch_size, classes)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        rate = cpu_training_rate(compute, decode.train_per_core if decode else None, cores)
        return Figure(
            rate,
            MEASURED_HERE,
            f"{compute:,.1f} img/s in training steps on this CPU"
            + (f", with decoding on the same {cores} core(s)" if decode else ""),
        )

    inputs = [
        host_input(h, job, all_runs.get(h.name, []), all_runs, data_id, req, local_gpu, asked, cpu_rate) for h in hosts
    ]
    rows = plan(job, inputs, decode, deadline_s, req.budget, gflops)
    save_estimates(rows, job, data_id)
    return rows, job


def cpu_training_rate(compute: float, decode_per_core: float | None, cores: int) -> float:
    """Images/s when the same cores train and decode: their core-seconds per image add up."""
    if not decode_per_core:
        return compute
    return cores / (cores / compute + 1.0 / decode_per_core)


def save_estimates(rows: list[Row], job: Job, data_id: str, now: float | None = None) -> None:
    """Keep the estimates, so `gpu-run compare` can set a run's actual time against its plan."""
    lines = []
    for r in rows:
        if r.total_s is None:
            continue
        fixed = r.total_s.value - r.parts["training"].value
        lines.append(
            json.dumps(
                {
                    "at": now or time.time(),
                    "host": r.host,
                    "model": job.model,
                    "dataset_id": data_id,
                    "image_size": job.image_size,
                    "cache_size": job.cache_size,
                    "epochs": job.epochs,
                    "epoch_s": round(r.epoch_s.value, 3),
                    "fixed_s": round(fixed, 3),
                    "total_s": round(r.total_s.value, 3),
                    "cost": float(r.cost),
                    "currency": r.currency,
                }
            )
        )
    if lines:
        with open(home_dir() / PLANS_FILE, "a") as f:
            f.write("\n".join(lines) + "\n")


def estimate_for_run(run: RunRecord) -> dict | None:
    """The latest plan made before a run for its host, model, dataset and image size, set to the
    run's epochs: {"epoch_s", "total_s", "at"}; None when no plan was made for it."""
    path = home_dir() / PLANS_FILE
    if not path.is_file():
        return None
    spec = run.args.get("spec", {})
    found = None
    for line in path.read_text().splitlines():
        try:
            p = json.loads(line)
        except ValueError:
            continue
        if (
            p.get("at", 0) <= run.created_at
            and p.get("host") == run.host
            and p.get("model") == run.model
            and p.get("dataset_id") == run.dataset_id
            and p.get("image_size") == spec.get("image_size")
            and p.get("cache_size", 0) == _whole(spec.get("cache_size"))
        ):
            found = p
    if found is None:
        return None
    epochs = spec.get("epochs") or found["epochs"]
    return {
        "epoch_s": found["epoch_s"],
        "total_s": round(found["fixed_s"] + epochs * found["epoch_s"], 3),
        "at": found["at"],
    }


def estimate_against_actual(ledger: Ledger, run_id: str) -> dict:
    """A finished run's time per epoch (training and evaluation) and in all (its first action on
    the machine to its confirmed stop), beside what `gpu-run plan` estimated for it; None where
    either is missing."""
    out = {"estimated_epoch_s": None, "actual_epoch_s": None, "estimated_total_s": None, "actual_total_s": None}
    run = ledger.get_run(run_id)
    estimate = estimate_for_run(run)
    if estimate:
        out["estimated_epoch_s"], out["estimated_total_s"] = estimate["epoch_s"], estimate["total_s"]
    phases = [p for p in ledger.phases(run.run_id) if p.ended_at is not None]
    if phases and run.status in ("succeeded", "stopped"):
        out["actual_total_s"] = round(max(p.ended_at for p in phases) - min(p.started_at for p in phases), 3)
    try:
        metrics = read_metrics((Path(run.run_dir or "") / "metrics.jsonl").read_text())
    except (OSError, ValueError, KeyError):
        metrics = []
    if metrics:
        # As plan counts an epoch: training, evaluation, and the checkpoints written after them.
        facts = run_facts(ledger, run)
        overhead = facts.epoch_overhead_s if facts else 0.0
        per_epoch = [m.get("epoch_time_s", 0.0) + _eval_s(m) + overhead for m in metrics]
        out["actual_epoch_s"] = round(sum(per_epoch) / len(per_epoch), 3)
    return out
