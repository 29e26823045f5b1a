"""The estimate behind `gpu-run plan`, pure: no files, no network, no clock.

For one host, a run's billed time is

    setup (connect, image) + upload + trainer start + epochs x (train + eval) + finish (pull, stop)

and each part is a Figure that carries where its number came from, so the table can say it.

An epoch is as fast as the slower of two pipes: the GPU (published ResNet-50 throughput, scaled to
the model by a published benchmark and to the image size by FLOPs), and the host's CPUs decoding
and augmenting the images (one core's rate measured on this laptop on the user's own images, times
the trainer's loader workers on the host). A past run of the same model on the same host replaces
the published GPU figure with what this user really got there. A host without a GPU is estimated
from past runs on it only (or, for `local`, a few training steps measured here): CPU training speed
follows no published table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from decimal import Decimal

from gpu_run.money.cost import cost_of
from gpu_run.plan import tables

# Where a figure came from; the table shows these words.
PUBLISHED = "published"
MEASURED_HERE = "measured here"
PAST_RUN = "past run"
CONFIG = "gpu-run.toml"
DOCTOR = "doctor"
ASSUMED = "assumed"

# Assumptions, said as such wherever they are used; a past run on the host replaces each one.
STEP_FLOOR_S = 0.010  # a GPU training step takes at least this long (kernel launches, the Python loop)
EVAL_SPEEDUP = 3.0  # evaluation is a forward pass: about a third of a training step's work
TRAINER_START_S = 20.0  # import torch, build the model, load weights, start the loader workers
FIRST_SETUP_S = {"local": 10.0, "ssh": 300.0, "aws": 360.0}  # connect (start), build or pull the image once
FINISH_S = {"local": 5.0, "ssh": 60.0, "aws": 90.0}  # pull the outputs, stop, see the machine go down
RECHECK_S = 5.0  # a dataset already on the host: both sides list their files, nothing moves
DEFAULT_VCPUS = 4
MIN_FIX_SAVING_S, MIN_FIX_SAVING = 60.0, 0.05  # --cache-size is suggested when it saves more than both
UPLINK_DEFAULT_MBIT = 20.0  # a typical home or campus uplink; --uplink says the real one


@dataclass(frozen=True)
class Figure:
    """A number and where it came from: one of the source words above, and the detail."""

    value: float
    source: str
    detail: str = ""
    references: tuple[str, ...] = ()  # the full citations behind a published figure

    def as_json(self) -> dict:
        value = round(self.value, 3) if isinstance(self.value, float) else self.value
        out = {"value": value, "source": self.source, "detail": self.detail}
        if self.references:
            out["references"] = list(self.references)
        return out


@dataclass(frozen=True)
class Fact:
    """A host's property that is not a number (its GPU), and where it came from."""

    value: str | None
    source: str
    detail: str = ""

    def as_json(self) -> dict:
        return {"value": self.value, "source": self.source, "detail": self.detail}


@dataclass(frozen=True)
class Job:
    """What the user wants to train, and on what data."""

    model: str
    epochs: int
    image_size: int
    batch_size: int
    train_images: int
    val_images: int
    dataset_bytes: int
    cache_size: int = 0


@dataclass(frozen=True)
class DecodeRates:
    """Images per second one CPU core reads, decodes and transforms, for training (augmented)
    and for evaluation (resize and centre crop); `cached`: the same for the --cache-size copy."""

    train_per_core: float
    val_per_core: float
    detail: str
    cached: DecodeRates | None = None
    cache_size: int = 0
    cache_bytes_ratio: float = 1.0  # the copy's bytes over the originals'


@dataclass(frozen=True)
class PastRun:
    """What one of this user's earlier runs on a host measured there."""

    run_id: str
    model: str
    image_size: int
    device: str  # "gpu" or "cpu"
    train_images_per_s: float
    eval_images_per_s: float | None = None
    epoch_overhead_s: float = 0.0  # checkpoints and predictions written after each epoch


@dataclass(frozen=True)
class Upload:
    """How the dataset gets to the host: not at all (local, or already there), or over the uplink."""

    already: str | None = None  # why no upload is needed, or None
    recheck_s: Figure | None = None  # the listing that confirms it is there
    uplink_mbit: Figure | None = None


@dataclass(frozen=True)
class HostInput:
    """Everything the estimate needs to know about one host, each part with its source."""

    name: str
    kind: str  # local | ssh | aws
    price_per_hour: float
    currency: str
    billing: str
    min_billed_s: int
    gpu: Fact  # value None: no GPU (a CPU host), or not known
    vcpus: Figure | None
    upload: Upload
    setup_s: Figure | None = None  # from past runs; None: the first-run assumption
    finish_s: Figure | None = None
    startup_s: Figure | None = None
    past: PastRun | None = None  # the past run whose speed applies (same model, or any on a CPU host)
    cpu_rate: Figure | None = None  # training images/s measured on this machine's CPU (local only)

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpu.value)


@dataclass
class Row:
    """One host's line in the plan."""

    host: str
    currency: str
    gpu: Fact
    free: bool = False  # the host costs nothing (not merely a run that rounds to 0.00)
    train_rate: Figure | None = None  # images/s the epoch runs at (the slower pipe)
    gpu_rate: Figure | None = None
    data_rate: Figure | None = None
    epoch_s: Figure | None = None
    parts: dict[str, Figure] = field(default_factory=dict)  # setup, upload, startup, training, finish
    total_s: Figure | None = None
    cost: Decimal | None = None
    limit: str | None = None  # gpu | cpu_decode | upload | cpu
    fix: dict | None = None  # {"cache_size", "saves_s", "saves"}
    unknown: str | None = None  # why there is no estimate, with the fix
    late: bool = False
    over_budget: bool = False
    recommended: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def qualifies(self) -> bool:
        return self.unknown is None and not self.late and not self.over_budget

    def as_json(self) -> dict:
        return {
            "host": self.host,
            "recommended": self.recommended,
            "meets_deadline": None if self.unknown else not self.late,
            "within_budget": None if self.unknown else not self.over_budget,
            "gpu": self.gpu.as_json(),
            "limit": self.limit,
            "images_per_s": self.train_rate.as_json() if self.train_rate else None,
            "gpu_images_per_s": self.gpu_rate.as_json() if self.gpu_rate else None,
            "data_images_per_s": self.data_rate.as_json() if self.data_rate else None,
            "epoch_s": self.epoch_s.as_json() if self.epoch_s else None,
            "total_s": self.total_s.as_json() if self.total_s else None,
            "parts_s": {k: v.as_json() for k, v in self.parts.items()},
            "cost": None if self.cost is None else {"amount": float(self.cost), "currency": self.currency},
            "fix": self.fix,
            "unknown": self.unknown,
            "notes": self.notes,
        }


# Rates -------------------------------------------------------------------------------------------


def size_factor(image_size: int, from_size: int = tables.REFERENCE_SIZE) -> float:
    """How much faster a convolutional network runs on image_size than on from_size: FLOPs grow
    with the pixel count."""
    return (from_size / image_size) ** 2


def model_speed_factor(model: str, gflops: float | None = None) -> tuple[float, str, str] | None:
    """Training speed relative to ResNet-50 on the same GPU: timm's benchmark where it ran the
    model, else the FLOP ratio (`gflops` at 224 px for a model missing from the shipped table).
    Returns (ratio, how it was found, its full reference)."""
    if model in tables.MODEL_SPEED_3090:
        ratio = tables.MODEL_SPEED_3090[model] / tables.MODEL_SPEED_3090[tables.REFERENCE_MODEL]
        return ratio, f"{model} {ratio:.2f}x ResNet-50 ({tables.TIMM_CITE})", tables.TIMM_SOURCE
    flops = gflops or tables.GFLOPS_224.get(model)
    if not flops:
        return None
    ratio = tables.GFLOPS_224[tables.REFERENCE_MODEL] / flops
    return (
        ratio,
        (
            f"{model} {ratio:.2f}x ResNet-50 by FLOPs ({flops:.2f} against "
            f"{tables.GFLOPS_224[tables.REFERENCE_MODEL]:.2f} GFLOPs, {tables.GFLOPS_CITE}; no "
            f"benchmark of it is shipped)"
        ),
        tables.GFLOPS_SOURCE,
    )


def gpu_train_rate(
    gpu_name: str, model: str, image_size: int, batch_size: int, gflops: float | None = None
) -> Figure | None:
    """Training images/s of a model on a GPU from the shipped tables, or None if either is unknown."""
    row = tables.find_gpu(gpu_name)
    speed = model_speed_factor(model, gflops)
    if row is None or speed is None:
        return None
    ratio, how, reference = speed
    rate = row.resnet50_images_per_s * ratio * size_factor(image_size)
    detail = f"{row.name} ResNet-50 {row.resnet50_images_per_s:,.0f} img/s ({row.cite}); {how}"
    if image_size != tables.REFERENCE_SIZE:
        detail += f"; x{size_factor(image_size):.2f} for {image_size} px by FLOPs"
    ceiling = batch_size / STEP_FLOOR_S
    if rate > ceiling:
        rate = ceiling
        detail += (
            f"; capped at {ceiling:,.0f} img/s: a step of {batch_size} images takes at least "
            f"{STEP_FLOOR_S * 1000:.0f} ms ({ASSUMED})"
        )
    return Figure(rate, PUBLISHED, detail, (row.source, reference))


def past_train_rate(past: PastRun, model: str, image_size: int, gflops: float | None = None) -> Figure | None:
    """A past run's measured speed, scaled to this image size (and, on a CPU, to this model by FLOPs)."""
    rate, detail = (
        past.train_images_per_s,
        f"run {past.run_id}: {past.train_images_per_s:,.1f} img/s training {past.model} at {past.image_size} px",
    )
    if past.model != model:
        mine, theirs = gflops or tables.GFLOPS_224.get(model), tables.GFLOPS_224.get(past.model)
        if not mine or not theirs:
            return None
        rate *= theirs / mine
        detail += f", x{theirs / mine:.2f} for {model} by FLOPs"
    if past.image_size != image_size:
        rate *= size_factor(image_size, past.image_size)
        detail += f", x{size_factor(image_size, past.image_size):.2f} for {image_size} px by FLOPs"
    return Figure(rate, PAST_RUN, detail)


def loader_workers(vcpus: int) -> int:
    """The trainer's own choice (trainer/train.py pick_workers): one core left to the main process, at most 8."""
    return max(0, min(8, vcpus - 1))


def data_rate(per_core: float, vcpus: Figure, what: str, detail: str) -> Figure:
    """Images/s the host's loader workers can decode and transform."""
    workers = max(1, loader_workers(int(vcpus.value)))
    return Figure(
        per_core * workers,
        MEASURED_HERE,
        f"{what}: {per_core:,.1f} img/s per core {detail} x {workers} loader worker(s) for "
        f"{int(vcpus.value)} vCPUs ({vcpus.source}{': ' + vcpus.detail if vcpus.detail else ''})",
    )


def pipe_rate(compute: float, data: float, workers: int) -> float:
    """Images/s of a loader feeding a model: overlapped when workers run beside the main
    process, one after the other when the main process loads its own batches (0 workers)."""
    if workers == 0:
        return 1.0 / (1.0 / compute + 1.0 / data)
    return min(compute, data)


def upload_time(job: Job, host: HostInput, bytes_ratio: float = 1.0) -> Figure:
    up = host.upload
    if up.already is not None:
        recheck = up.recheck_s or Figure(0.0 if host.kind == "local" else RECHECK_S, ASSUMED, "")
        return Figure(recheck.value, recheck.source, up.already)
    uplink = up.uplink_mbit or Figure(
        UPLINK_DEFAULT_MBIT, ASSUMED, "no sync to this host measured yet; give --uplink MBIT"
    )
    size = job.dataset_bytes * bytes_ratio
    seconds = size * 8 / (uplink.value * 1e6)
    detail = f"{megabytes(size)} at {uplink.value:g} Mbit/s"
    return Figure(seconds, uplink.source, f"{detail} ({uplink.detail})" if uplink.detail else detail)


def megabytes(size: float) -> str:
    return f"{size / 1e6:,.0f} MB" if size >= 10e6 else f"{size / 1e6:.1f} MB"


# One host ----------------------------------------------------------------------------------------


def estimate_host(job: Job, host: HostInput, decode: DecodeRates | None, gflops: float | None = None) -> Row:
    """The row for one host: what an epoch and the whole run take and cost, and what limits it."""
    row = Row(host=host.name, currency=host.currency, gpu=host.gpu, free=host.price_per_hour == 0)
    if host.has_gpu:
        speeds = _gpu_speeds(job, host, decode, gflops, row)
    else:
        speeds = _cpu_speeds(job, host, gflops, row)
    if speeds is None:
        return row
    _fill_times(job, host, row, *speeds)
    if (
        row.limit in ("cpu_decode", "upload")
        and decode is not None
        and decode.cached is not None
        and not job.cache_size
    ):
        _suggest_cache(job, host, decode, gflops, row)
    return row


def _gpu_speeds(job: Job, host: HostInput, decode: DecodeRates | None, gflops: float | None, row: Row):
    assert host.gpu.value is not None  # estimate_host asks only for a host that has a GPU
    table = gpu_train_rate(host.gpu.value, job.model, job.image_size, job.batch_size, gflops)
    past = host.past if host.past is not None and host.past.model == job.model and host.past.device == "gpu" else None
    measured = past_train_rate(past, job.model, job.image_size) if past else None
    if table is None and measured is None:
        if tables.find_gpu(host.gpu.value) is None:
            row.unknown = (
                f"no published training speed for GPU {host.gpu.value!r}; train on it once "
                f"(plan then uses your own speed there)"
            )
        else:
            row.unknown = f"no speed known for model {job.model!r}; train it on this host once"
        return None
    vcpus = host.vcpus or Figure(DEFAULT_VCPUS, ASSUMED, "set vcpus = N or run `gpu-run doctor`")
    workers = loader_workers(int(vcpus.value))
    if measured is not None:
        # What this user got on this host, with its data path included: nothing to combine.
        assert past is not None  # measured comes from it
        row.gpu_rate = table
        train = measured
        eval_rate = (
            Figure(
                past.eval_images_per_s * size_factor(job.image_size, past.image_size), PAST_RUN, f"run {past.run_id}"
            )
            if past.eval_images_per_s
            else Figure(
                train.value * EVAL_SPEEDUP, ASSUMED, f"{EVAL_SPEEDUP:g}x the training speed (a forward pass only)"
            )
        )
        if decode is not None:
            row.data_rate = data_rate(decode.train_per_core, vcpus, "decode and augment", decode.detail)
        limit = "cpu_decode" if (row.data_rate and table and row.data_rate.value < table.value) else "gpu"
        return train, eval_rate, limit
    assert table is not None  # neither figure known returned above
    row.gpu_rate = table
    gpu_eval = min(table.value * EVAL_SPEEDUP, job.batch_size / (STEP_FLOOR_S / EVAL_SPEEDUP))
    if decode is None:
        return table, Figure(gpu_eval, PUBLISHED, f"{EVAL_SPEEDUP:g}x the training speed ({ASSUMED})"), "gpu"
    row.data_rate = data_rate(decode.train_per_core, vcpus, "decode and augment", decode.detail)
    val_data = decode.val_per_core * max(1, workers)
    train_value = pipe_rate(table.value, row.data_rate.value, workers)
    limit = "cpu_decode" if row.data_rate.value < table.value else "gpu"
    if limit == "cpu_decode":
        row.notes.append(
            "The trainer's --decode auto may move JPEG decoding to the GPU (nvjpeg) when it measures "
            "that faster at start-up; this estimate counts the CPUs only, and a past run here shows "
            "what it chose"
        )
    source = MEASURED_HERE if limit == "cpu_decode" else PUBLISHED
    train = Figure(train_value, source, row.data_rate.detail if limit == "cpu_decode" else table.detail)
    eval_rate = Figure(
        pipe_rate(gpu_eval, val_data, workers),
        source,
        "evaluation: the slower of the GPU's forward "
        f"pass ({EVAL_SPEEDUP:g}x training, {ASSUMED}) and the resize-and-crop decode",
    )
    return train, eval_rate, limit


def _cpu_speeds(job: Job, host: HostInput, gflops: float | None, row: Row):
    train = past_train_rate(host.past, job.model, job.image_size, gflops) if host.past is not None else None
    if train is not None:
        assert host.past is not None  # train comes from it
        eval_rate = (
            Figure(
                host.past.eval_images_per_s * (train.value / host.past.train_images_per_s),
                PAST_RUN,
                f"run {host.past.run_id}, scaled as training",
            )
            if host.past.eval_images_per_s
            else None
        )
    elif host.cpu_rate is not None:
        train, eval_rate = host.cpu_rate, None
    else:
        if host.gpu.source == ASSUMED:  # nothing says whether it has a GPU
            row.unknown = (
                f'which GPU {host.name} has is not known: set gpu = "..." in [hosts.{host.name}] '
                f"or run `gpu-run doctor {host.name}`"
            )
        else:
            row.unknown = (
                f"no GPU, and no past run of {job.model} on {host.name} to measure its CPU by; train there once"
            )
        return None
    eval_rate = eval_rate or Figure(train.value * EVAL_SPEEDUP, ASSUMED, f"{EVAL_SPEEDUP:g}x the training speed")
    return train, eval_rate, "cpu"


def _fill_times(job: Job, host: HostInput, row: Row, train: Figure, eval_rate: Figure, limit: str) -> None:
    epoch = job.train_images / train.value + job.val_images / eval_rate.value
    detail = (
        f"{job.train_images} train images at {train.value:,.1f} img/s, "
        f"{job.val_images} val images at {eval_rate.value:,.1f} img/s"
    )
    if host.past is not None and host.past.model == job.model and host.past.epoch_overhead_s:
        epoch += host.past.epoch_overhead_s
        detail += f", {host.past.epoch_overhead_s:.1f} s of checkpoints (run {host.past.run_id})"
    row.train_rate = train
    row.epoch_s = Figure(epoch, train.source, detail)
    kind = host.kind if host.kind in FIRST_SETUP_S else "ssh"
    row.parts = {
        "setup": host.setup_s
        or Figure(FIRST_SETUP_S[kind], ASSUMED, "connect, and build or pull the trainer image once"),
        "upload": upload_time(job, host),
        "startup": host.startup_s
        or Figure(TRAINER_START_S, ASSUMED, "import torch, build the model, start the loaders"),
        "training": Figure(job.epochs * epoch, train.source, f"{job.epochs} epochs"),
        "finish": host.finish_s
        or Figure(FINISH_S[kind], ASSUMED, "pull the outputs, stop the machine, see it go down"),
    }
    total = sum(p.value for p in row.parts.values())
    row.total_s = Figure(total, train.source, "setup + upload + trainer start + training + finish")
    row.cost = cost_of(total, host.price_per_hour, host.billing, host.min_billed_s)
    row.limit = "upload" if row.parts["upload"].value > row.parts["training"].value else limit


def _suggest_cache(job: Job, host: HostInput, decode: DecodeRates, gflops: float | None, row: Row) -> None:
    """The same host with --cache-size: decoding small copies, and uploading them instead."""
    cached_job = replace(job, cache_size=decode.cache_size)
    cached_host = host
    if host.upload.already is None:
        cached_job = replace(cached_job, dataset_bytes=int(job.dataset_bytes * decode.cache_bytes_ratio))
    # The cached copy is a different dataset id on the host: it is uploaded (once) even when the
    # originals are already there.
    elif host.kind != "local":
        cached_host = replace(host, upload=Upload(uplink_mbit=host.upload.uplink_mbit))
        cached_job = replace(cached_job, dataset_bytes=int(job.dataset_bytes * decode.cache_bytes_ratio))
    alt = estimate_host(cached_job, cached_host, decode.cached, gflops)
    assert row.total_s is not None and row.cost is not None  # _fill_times set them before this is asked
    saves_s = row.total_s.value - alt.total_s.value if alt.total_s is not None else 0.0
    if saves_s < max(MIN_FIX_SAVING_S, MIN_FIX_SAVING * row.total_s.value):
        return
    assert alt.total_s is not None and alt.cost is not None  # saves_s would be 0 without them
    row.fix = {
        "cache_size": decode.cache_size,
        "saves_s": round(row.total_s.value - alt.total_s.value, 1),
        "saves": float(row.cost - alt.cost),
        "total_s": round(alt.total_s.value, 1),
    }


# All hosts ---------------------------------------------------------------------------------------


def mark(rows: list[Row], deadline_s: float | None, budget: float | None) -> None:
    """Flag the rows that miss the deadline or go over the budget (in each host's own currency)."""
    for row in rows:
        if row.unknown is not None:
            continue
        assert row.total_s is not None and row.cost is not None  # a row with an estimate has both
        row.late = deadline_s is not None and row.total_s.value > deadline_s
        row.over_budget = budget is not None and row.cost > Decimal(str(budget))


def _total_s(row: Row) -> float:
    """The total of a row that has an estimate (its unknown is None)."""
    assert row.total_s is not None
    return row.total_s.value


def recommend(rows: list[Row]) -> list[Row]:
    """Mark the cheapest row that meets the deadline and the budget (the faster one on a tie) and
    return the rows best first. Amounts in different currencies are never compared: a free host
    beats any price, otherwise each currency gets its own cheapest row."""
    fits = [r for r in rows if r.qualifies]
    free = [r for r in fits if r.free]
    if free:
        min(free, key=_total_s).recommended = True
    else:
        for currency in sorted({r.currency for r in fits}):
            same = [r for r in fits if r.currency == currency]
            min(same, key=lambda r: (r.cost, _total_s(r))).recommended = True

    def order(r: Row):
        if r.unknown is not None:
            return (3, 0, 0.0, r.host)
        if r.qualifies:
            return (0 if r.recommended else 1, r.cost, _total_s(r), r.host)
        return (2, 0, _total_s(r), r.host)

    return sorted(rows, key=order)


def plan(
    job: Job,
    hosts: list[HostInput],
    decode: DecodeRates | None,
    deadline_s: float | None,
    budget: float | None,
    gflops: float | None = None,
) -> list[Row]:
    """Every host's row, marked against the deadline and budget, best first."""
    rows = [estimate_host(job, h, decode, gflops) for h in hosts]
    mark(rows, deadline_s, budget)
    return recommend(rows)


def parse_duration(text: str) -> float:
    """'6h', '90m', '1h30m', '2d', '45s' or a bare number of hours -> seconds; ValueError otherwise."""
    text = text.strip().lower().replace(" ", "")
    try:
        hours = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(hours) or hours <= 0:
            raise ValueError(text)
        return hours * 3600
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    total, number = 0.0, ""
    for ch in text:
        if ch.isdigit() or ch == ".":
            number += ch
        elif ch in units and number:
            total += float(number) * units[ch]
            number = ""
        else:
            raise ValueError(text)
    if number or total <= 0:
        raise ValueError(text)
    return total
