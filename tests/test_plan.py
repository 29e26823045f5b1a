"""`gpu-run plan`: the estimator's arithmetic (pure: shipped tables, FLOP scaling, decode-bound or
GPU-bound, deadline and budget, the recommendation), its table at 80 columns, and on the test bed,
its ranking of the hosts and how close its estimate comes to a real run."""

from __future__ import annotations

import json
import sqlite3
from decimal import Decimal

import pytest
from rich.console import Console

from gpu_run.config import parse_host
from gpu_run.errors import ConfigError
from gpu_run.plan import estimate, render, tables
from gpu_run.plan.estimate import (
    ASSUMED,
    CONFIG,
    MEASURED_HERE,
    PAST_RUN,
    PUBLISHED,
    DecodeRates,
    Fact,
    Figure,
    HostInput,
    Job,
    PastRun,
    Upload,
    estimate_host,
    gpu_train_rate,
    model_speed_factor,
    parse_duration,
)

JOB = Job(model="resnet18", epochs=20, image_size=224, batch_size=32, train_images=10_000, val_images=2_000,
          dataset_bytes=2_000_000_000)
FAST_DECODE = DecodeRates(train_per_core=1000.0, val_per_core=2000.0, detail="(test)")
SLOW_DECODE = DecodeRates(train_per_core=40.0, val_per_core=80.0, detail="(test)", cache_size=256, cache_bytes_ratio=0.1,
                          cached=DecodeRates(train_per_core=400.0, val_per_core=800.0, detail="(test, resized)"))


def host(name="box", gpu="T4", vcpus=4, price=1.0, currency="CNY", billing="per_second", min_billed_s=0,
         kind="ssh", upload=None, past=None, **kw) -> HostInput:
    return HostInput(
        name=name, kind=kind, price_per_hour=price, currency=currency, billing=billing, min_billed_s=min_billed_s,
        gpu=Fact(gpu, CONFIG, "") if gpu else Fact(None, PAST_RUN, ""),
        vcpus=Figure(vcpus, CONFIG, "") if vcpus else None,
        upload=upload or Upload(uplink_mbit=Figure(100.0, "--uplink", "")), past=past, **kw)


# The shipped tables --------------------------------------------------------------------------------


@pytest.mark.parametrize("name, row", [
    ("NVIDIA GeForce RTX 4090", "RTX 4090"), ("Tesla T4", "T4"), ("T4", "T4"),
    ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM4"), ("NVIDIA A100-PCIE-40GB", "A100 40GB PCIe"),
    ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe"), ("NVIDIA A10G", "A10G"), ("NVIDIA A10", "A10"),
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H200", "H200"),
    ("NVIDIA GeForce RTX 2080 Ti", "RTX 2080 Ti"), ("RTX 2080Ti", "RTX 2080 Ti"),
    ("NVIDIA RTX 6000 Ada Generation", "RTX 6000 Ada"), ("Quadro RTX 6000", "Quadro RTX 6000"),
    ("Tesla V100-SXM2-16GB", "V100"), ("NVIDIA RTX A6000", "RTX A6000"),
])
def test_gpu_names_as_people_nvidia_smi_and_torch_write_them_find_their_row(name, row):
    assert tables.find_gpu(name).name == row


def test_unknown_gpus_have_no_row_rather_than_a_wrong_one():
    for name in ("NVIDIA L4", "Radeon RX 7900", "A1000", "something"):
        assert tables.find_gpu(name) is None


def test_every_gpu_figure_has_a_source_and_the_issues_figures_are_there():
    for row in tables.GPUS:
        assert row.resnet50_images_per_s > 0 and row.source and row.cite
    assert tables.find_gpu("H200").resnet50_images_per_s == 3079
    assert tables.find_gpu("A10").resnet50_images_per_s == 638
    assert 1582 <= tables.find_gpu("A100").resnet50_images_per_s <= 2470
    assert "derived" in tables.find_gpu("T4").source  # said, not hidden


def test_aws_instance_types_say_their_gpu_and_vcpus():
    assert tables.aws_instance_facts("g4dn.xlarge") == ("T4", 4)
    assert tables.aws_instance_facts("g5.12xlarge") == ("A10G", 48)
    assert tables.aws_instance_facts("p3.2xlarge") == ("V100", 8)
    assert tables.aws_instance_facts("m5.large") == (None, None)


# Model and image-size scaling ----------------------------------------------------------------------


def test_model_speed_comes_from_a_benchmark_where_there_is_one_and_from_flops_otherwise():
    ratio, how, ref = model_speed_factor("resnet18")
    assert ratio == pytest.approx(3481.78 / 1218.01) and "timm" in ref
    # EfficientNet-B0 has a tenth of ResNet-50's FLOPs but trains only 1.4x faster: FLOPs would say 10x.
    assert model_speed_factor("efficientnet_b0")[0] == pytest.approx(1.438, abs=0.01)
    ratio, how, ref = model_speed_factor("resnext50_32x4d")
    assert ratio == pytest.approx(4.089 / 4.23) and "FLOPs" in how
    assert model_speed_factor("no_such_model") is None
    assert model_speed_factor("no_such_model", gflops=8.178)[0] == pytest.approx(0.5)


def test_gpu_rate_is_the_published_figure_scaled_by_model_and_by_flops_for_the_image_size():
    at_224 = gpu_train_rate("RTX 4090", "resnet50", 224, batch_size=256)
    assert at_224.value == pytest.approx(1301) and at_224.source == PUBLISHED
    assert "Lambda" in at_224.detail and any("lambdal/deeplearning-benchmark" in r for r in at_224.references)
    at_112 = gpu_train_rate("RTX 4090", "resnet50", 112, batch_size=256)
    assert at_112.value == pytest.approx(4 * 1301) and "by FLOPs" in at_112.detail
    assert gpu_train_rate("NVIDIA L4", "resnet50", 224, 32) is None


def test_a_small_batch_on_a_fast_gpu_is_capped_by_the_step_time_and_says_it_is_assumed():
    rate = gpu_train_rate("H100", "resnet18", 224, batch_size=32)
    assert rate.value == pytest.approx(32 / estimate.STEP_FLOOR_S)
    assert "assumed" in rate.detail


# Bottleneck, time and cost -------------------------------------------------------------------------


def test_a_gpu_fed_fast_enough_is_gpu_bound():
    row = estimate_host(JOB, host(gpu="T4", vcpus=16), FAST_DECODE)
    gpu = 425 * tables.MODEL_SPEED_3090["resnet18"] / tables.MODEL_SPEED_3090["resnet50"]
    assert row.limit == "gpu" and row.train_rate.value == pytest.approx(gpu)
    assert row.data_rate.value == pytest.approx(1000 * 8)  # 8 loader workers at most
    assert row.epoch_s.value == pytest.approx(10_000 / gpu + 2_000 / (3 * gpu))
    assert row.parts["training"].value == pytest.approx(20 * row.epoch_s.value)
    assert row.total_s.value == pytest.approx(sum(p.value for p in row.parts.values()))


def test_few_vcpus_decoding_big_images_make_a_run_decode_bound_and_the_cache_is_offered():
    row = estimate_host(JOB, host(gpu="RTX 4090", vcpus=4), SLOW_DECODE)
    assert row.limit == "cpu_decode"
    assert row.train_rate.value == pytest.approx(40 * 3) and row.train_rate.source == MEASURED_HERE
    assert "3 loader worker(s) for 4 vCPUs" in row.data_rate.detail
    assert row.fix["cache_size"] == 256 and row.fix["saves_s"] > 0 and row.fix["saves"] > 0
    # The copy decodes 10x faster and uploads a tenth of the bytes.
    assert row.fix["total_s"] < row.total_s.value / 3


def test_a_host_with_one_vcpu_loads_in_the_main_process_one_batch_after_the_other():
    row = estimate_host(JOB, host(gpu="T4", vcpus=1), SLOW_DECODE)
    gpu = row.gpu_rate.value
    assert row.train_rate.value == pytest.approx(1 / (1 / gpu + 1 / 40))


def test_a_slow_uplink_makes_the_upload_the_limit_and_data_already_there_is_not_sent():
    slow = host(upload=Upload(uplink_mbit=Figure(1.0, "--uplink", "")))
    row = estimate_host(JOB, slow, FAST_DECODE)
    assert row.limit == "upload" and row.parts["upload"].value == pytest.approx(2e9 * 8 / 1e6)
    there = host(upload=Upload(already="already on the host (synced by run r1)"))
    row = estimate_host(JOB, there, FAST_DECODE)
    assert row.parts["upload"].value == estimate.RECHECK_S and "already on the host" in row.parts["upload"].detail
    assert row.limit == "gpu"


def test_big_images_behind_a_slow_uplink_get_the_cache_offered_too():
    slow = host(gpu="RTX 4090", vcpus=32, upload=Upload(uplink_mbit=Figure(10.0, "--uplink", "")))
    row = estimate_host(JOB, slow, SLOW_DECODE)
    assert row.limit == "upload" and row.fix["cache_size"] == 256
    # A tenth of the bytes to send, and images that decode 10x faster.
    assert row.fix["saves_s"] > 0.9 * (2e9 * 8 / 10e6) * 0.9


def test_a_cache_that_saves_next_to_nothing_is_not_suggested():
    barely = DecodeRates(40.0, 80.0, "(test)", cache_size=256, cache_bytes_ratio=0.99,
                         cached=DecodeRates(40.5, 81.0, "(test)"))
    assert estimate_host(JOB, host(gpu="RTX 4090", vcpus=4), barely).fix is None


def test_without_a_measured_uplink_the_default_is_said_to_be_assumed():
    row = estimate_host(JOB, host(upload=Upload()), FAST_DECODE)
    assert row.parts["upload"].source == ASSUMED and "--uplink" in row.parts["upload"].detail


def test_a_past_run_of_the_same_model_replaces_the_published_speed():
    past = PastRun("r1", "resnet18", 112, "gpu", train_images_per_s=2000.0, eval_images_per_s=5000.0)
    row = estimate_host(JOB, host(gpu="T4", past=past), FAST_DECODE)
    assert row.train_rate.source == PAST_RUN and "run r1" in row.train_rate.detail
    assert row.train_rate.value == pytest.approx(2000 / 4)  # 112 px -> 224 px: 4x the FLOPs
    assert row.gpu_rate.source == PUBLISHED  # still shown beside it


def test_a_cpu_host_is_estimated_from_its_past_runs_only():
    assert "train there once" in estimate_host(JOB, host(gpu=None), FAST_DECODE).unknown
    past = PastRun("r2", "resnet50", 224, "cpu", train_images_per_s=10.0)
    row = estimate_host(JOB, host(gpu=None, past=past), FAST_DECODE)
    assert row.limit == "cpu" and row.train_rate.value == pytest.approx(10 * 4.089 / 1.814)
    assert "by FLOPs" in row.train_rate.detail


def test_a_host_whose_gpu_nobody_knows_gets_no_estimate_and_the_fix():
    unknown = host(gpu=None)
    unknown = HostInput(**{**unknown.__dict__, "gpu": Fact(None, ASSUMED, "")})
    row = estimate_host(JOB, unknown, FAST_DECODE)
    assert "gpu-run doctor box" in row.unknown and 'gpu = "..."' in row.unknown
    assert "train on it once" in estimate_host(JOB, host(gpu="NVIDIA L4"), FAST_DECODE).unknown


def test_cost_uses_the_hosts_billing_unit_and_minimum():
    short = Job(**{**JOB.__dict__, "epochs": 1, "train_images": 100, "val_images": 10})
    per_second = estimate_host(short, host(price=3.6), FAST_DECODE)
    per_hour = estimate_host(short, host(price=3.6, billing="per_hour"), FAST_DECODE)
    assert per_second.cost == Decimal(str(round(per_second.total_s.value / 1000, 2))) or per_second.cost < 1
    assert per_hour.cost == Decimal("3.60")  # a few minutes bill a whole hour
    minimum = estimate_host(short, host(price=3.6, min_billed_s=3600), FAST_DECODE)
    assert minimum.cost == Decimal("3.60")


# Deadline, budget, recommendation ------------------------------------------------------------------


def rows_for(hosts, deadline_s=None, budget=None):
    return estimate.plan(JOB, hosts, FAST_DECODE, deadline_s, budget)


def test_rows_late_or_over_budget_are_marked_and_the_cheapest_that_meets_both_is_recommended():
    hosts = [host("slow-cheap", gpu="T4", price=0.5), host("fast-dear", gpu="H100", price=20.0),
             host("mid", gpu="RTX 4090", price=2.0)]
    rows = rows_for(hosts)
    assert rows[0].host == "slow-cheap" and rows[0].recommended
    by = {r.host: r for r in rows}
    deadline = (by["mid"].total_s.value + by["slow-cheap"].total_s.value) / 2
    rows = rows_for(hosts, deadline_s=deadline)
    by = {r.host: r for r in rows}
    assert by["slow-cheap"].late and not by["slow-cheap"].recommended
    assert by["mid"].recommended and not by["fast-dear"].recommended
    assert [r.host for r in rows] == ["mid", "fast-dear", "slow-cheap"]  # fitting rows first, by cost
    rows = rows_for(hosts, deadline_s=deadline, budget=float(by["mid"].cost) - 0.01)
    by = {r.host: r for r in rows}
    assert by["mid"].over_budget and by["fast-dear"].over_budget and not any(r.recommended for r in rows)


def test_a_free_host_beats_any_price_and_currencies_are_never_compared():
    rows = rows_for([host("paid", price=0.1), host("mine", price=0.0, currency="USD")])
    assert rows[0].host == "mine" and rows[0].recommended and not rows[1].recommended
    rows = rows_for([host("cny", price=0.5, currency="CNY"), host("usd", price=0.5, currency="USD"),
                     host("usd-dear", price=5.0, currency="USD")])
    assert {r.host for r in rows if r.recommended} == {"cny", "usd"}


def test_rows_without_an_estimate_come_last_and_are_never_recommended():
    rows = rows_for([host("unknown", gpu="NVIDIA L4", price=0.0), host("t4", price=1.0)])
    assert [r.host for r in rows] == ["t4", "unknown"] and rows[0].recommended
    assert rows[1].as_json()["meets_deadline"] is None


@pytest.mark.parametrize("text, seconds", [("6h", 21600), ("90m", 5400), ("1h30m", 5400), ("2d", 172800),
                                           ("45s", 45), ("1.5", 5400), (" 2h ", 7200)])
def test_deadlines_are_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "0", "-1h", "6x", "h", "1h30", "nan", "inf"])
def test_a_deadline_that_is_not_a_duration_is_refused(text):
    with pytest.raises(ValueError):
        parse_duration(text)


# The table -----------------------------------------------------------------------------------------


def test_the_table_fits_80_columns_and_never_cuts_a_host_name():
    names = ["autodl-rtx4090-westb", "local", "g4dn-us-east-1-spot", "vast-a100-80gb-pcie"]
    hosts = [host(names[0], gpu="RTX 4090", vcpus=4), host(names[1], gpu=None, kind="local", price=0.0,
             past=PastRun("r", "resnet18", 224, "cpu", 3.0)), host(names[2], gpu="NVIDIA A100-SXM4-80GB"),
             host(names[3], gpu="NVIDIA L4")]
    rows = estimate.plan(JOB, hosts, SLOW_DECODE, 6 * 3600, 30.0)
    console = Console(width=80, record=True, color_system=None)
    render.print_plan(rows, JOB, 6 * 3600, 30.0, console=console)
    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    table_lines = lines[: lines.index(next(line for line in lines if line.startswith("Sources:")))]
    for name in names:
        assert any(line.lstrip().startswith(name + " ") for line in table_lines), (name, text)
    assert "BEST" in text and "Sources:" in text and "--cache-size 256 (a copy" in text.replace("\n", " ")


def test_json_rows_carry_every_figure_with_its_source():
    rows = estimate.plan(JOB, [host(gpu="RTX 4090")], SLOW_DECODE, None, None)
    out = json.loads(json.dumps([r.as_json() for r in rows]))
    row = out[0]
    for key in ("images_per_s", "gpu_images_per_s", "data_images_per_s", "epoch_s", "total_s"):
        assert {"value", "source", "detail"} <= set(row[key])
    assert set(row["parts_s"]) == {"setup", "upload", "startup", "training", "finish"}
    assert row["cost"]["currency"] == "CNY" and row["limit"] == "cpu_decode" and row["fix"]["cache_size"] == 256


# Host settings -------------------------------------------------------------------------------------


def test_hosts_say_their_gpu_and_vcpus_and_bad_values_are_refused_in_one_line():
    h = parse_host("box", {"ssh": "box", "gpu": "RTX 4090", "vcpus": 12})
    assert (h.gpu, h.vcpus) == ("RTX 4090", 12)
    for bad, words in (({"vcpus": 0}, "vcpus must be"), ({"vcpus": "8"}, "vcpus must be"), ({"vcpus": True}, "vcpus must be"),
                       ({"gpu": ""}, "gpu must name"), ({"gpu": 4090}, "gpu must name")):
        with pytest.raises(ConfigError, match=words):
            parse_host("box", {"ssh": "box", **bad})


def test_doctor_facts_are_kept_per_host(gpu_run_home):
    from gpu_run import host_facts

    host_facts.record("box", ["NVIDIA A10G"], 4, now=1.0)
    host_facts.record("other", [], None, now=2.0)
    assert host_facts.load("box") == {"gpu": "NVIDIA A10G", "gpus": ["NVIDIA A10G"], "vcpus": 4, "checked_at": 1.0}
    assert host_facts.load("other")["gpu"] is None and host_facts.load("missing") == {}


def test_decoding_is_measured_here_through_the_trainers_own_dataset_code(dataset):
    from gpu_run.plan.gather import measure_decode

    rates = measure_decode(dataset, 32)
    assert rates.train_per_core > 0 and rates.val_per_core > 0 and "of your images" in rates.detail
    assert rates.cached is None  # 48 px images: no copy would make them smaller


@pytest.fixture(scope="module")
def big_images(tmp_path_factory):
    """A few photo-sized JPEGs (noise compresses like detail), far over what 32 px training reads."""
    from PIL import Image

    root = tmp_path_factory.mktemp("big")
    for split, n in (("train", 6), ("val", 2)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.effect_noise((1200, 900), 60 + i).convert("RGB").save(root / split / cls / f"{i}.jpg", quality=90)
    return root


def test_the_copy_to_suggest_is_the_cache_modules_advice_timed_through_the_trainer(big_images):
    from gpu_run.cache import advise_cache
    from gpu_run.plan.gather import measure_decode
    from gpu_run.trainer.train import build_transforms, decode_short_side

    advice = advise_cache(big_images, 32)
    rates = measure_decode(big_images, 32, advice=advice)
    # The copy keeps every pixel training reads: the trainer's own rule.
    assert rates.cache_size == advice.cache_size == decode_short_side(build_transforms(32, "standard")[0])
    assert rates.cache_bytes_ratio < 0.5 and rates.cached.train_per_core > rates.train_per_core
    # Planning for a given --cache-size times copies of a sample at that size.
    given = measure_decode(big_images, 32, cache_size=160)
    assert given.cache_size == 160 and given.cache_bytes_ratio < 0.2 and given.train_per_core > rates.train_per_core


def test_past_runs_are_read_from_the_ledger_and_the_run_folder(gpu_run_home, tmp_path):
    """A finished run's speed, its trainer's start, and what each epoch spends beyond training and
    evaluation (checkpoints), from metrics.jsonl, the events in train.log and the ledger's phases."""
    from gpu_run.ledger import Ledger
    from gpu_run.paths import ledger_path
    from gpu_run.plan.gather import estimate_against_actual, past_runs

    ledger = Ledger(ledger_path())
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    spec = {"spec": {"image_size": 64, "epochs": 2, "cache_size": 0}}
    ledger.create_run("r1", "box", model="resnet18", dataset_id="d-1", run_dir=str(run_dir), status="succeeded",
                      args_json=json.dumps(spec), created_at=1000.0)
    for phase, start, end in (("connect", 1000, 1002), ("build", 1002, 1003), ("sync", 1003, 1013),
                              ("train", 1013, 1043), ("pull", 1043, 1046), ("stop", 1046, 1050)):
        ledger.start_phase("r1", phase, at=start)
        ledger.end_phase("r1", phase, at=end)
    metrics = [{"epoch": e, "train_images_per_s": 10.0, "epoch_time_s": 8.0, "val_images": 20,
                "eval_images_per_s": 20.0, "val_acc": 0.5} for e in (1, 2)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    events = [{"event": "start", "time": 5000.0, "device": "cpu", "workers": 3},
              {"event": "epoch", "time": 5009.5, "epoch": 1}, {"event": "epoch", "time": 5019.0, "epoch": 2}]
    (run_dir / "train.log").write_text("a log line\n" + "".join(json.dumps(e) + "\n" for e in events))

    (facts,) = past_runs(ledger)["box"]
    assert facts.device == "cpu" and facts.workers == 3 and facts.image_size == 64
    assert facts.epoch_overhead_s == pytest.approx(0.5)  # 9.5 s between events - 8 s training - 1 s evaluation
    assert facts.startup_s == pytest.approx(30 - 2 * 9.5)
    assert facts.phase_s["sync"] == 10 and facts.train_images_per_s == 10.0
    vs = estimate_against_actual(ledger, "r1")
    assert vs["actual_total_s"] == 50 and vs["actual_epoch_s"] == pytest.approx(9.5)
    assert vs["estimated_total_s"] is None  # no plan was made for it


# The test bed --------------------------------------------------------------------------------------

EXTRA_HOSTS = """
[hosts.cloud-t4]
ssh = "cloud-t4"
price_per_hour = 3.0
currency = "CNY"
stop_command = "shutdown"
gpu = "T4"
vcpus = 4

[hosts.cloud-4090]
ssh = "cloud-4090"
price_per_hour = 2.0
currency = "CNY"
stop_command = "shutdown"
gpu = "RTX 4090"
vcpus = 12
"""

FAST = ["--image-size", "48", "--batch-size", "8", "--workers", "0", "--weights", "none"]
PLAN = ["--image-size", "48", "--batch-size", "8", "--epochs", "2"]
SOURCES = {"published", "measured here", "past run", "gpu-run.toml", "doctor", "assumed", "--uplink", "you said",
           "AWS instance type"}


def phase_span(home, run_id: str) -> float:
    """From the run's first action on the machine to its confirmed stop: what plan's total estimates."""
    db = sqlite3.connect(home / "runs.db")
    start, end = db.execute("SELECT MIN(started_at), MAX(ended_at) FROM phases WHERE run_id = ?", [run_id]).fetchone()
    return end - start


def figures(obj):
    """Every {value, source, detail} figure in a plan row."""
    if isinstance(obj, dict):
        if "source" in obj and "value" in obj:
            yield obj
        for v in obj.values():
            yield from figures(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from figures(v)


@pytest.mark.integration
def test_plan_ranks_the_test_bed_hosts_and_its_estimate_holds(ssh_host, dataset, gpu_run_home):
    ssh_host.write_config(grace_s=3, extra=EXTRA_HOSTS)
    cli = ssh_host.cli
    # One short run on each of the test bed's (CPU) hosts, so that the ledger has a past run.
    for host in ("t4-box", "local"):
        cli.json("train", "--host", host, *FAST, "--epochs", "1", "--data", str(dataset))
        ssh_host.start_machine()

    rows = cli.json("plan", "--data", str(dataset), *PLAN, "--deadline", "1h", "--budget", "0.05")
    by_host = {r["host"]: r for r in rows}
    assert set(by_host) == {"local", "t4-box", "cloud-t4", "cloud-4090"}
    # The free host that meets the deadline is the cheapest; the paid ones are marked against the budget.
    assert rows[0]["host"] == "local" and rows[0]["recommended"]
    assert by_host["t4-box"]["within_budget"] and by_host["t4-box"]["meets_deadline"]
    for name in ("cloud-t4", "cloud-4090"):
        assert by_host[name]["within_budget"] is False and not by_host[name]["recommended"]
        assert by_host[name]["gpu_images_per_s"]["source"] == "published"
        assert by_host[name]["parts_s"]["setup"]["source"] == "assumed"
    # The CPU hosts are estimated from the past runs, and every figure says where it came from.
    for name in ("local", "t4-box"):
        row = by_host[name]
        assert row["gpu"]["value"] is None and row["gpu"]["source"] == "past run"
        assert row["images_per_s"]["source"] == "past run" and row["limit"] == "cpu"
        assert row["parts_s"]["setup"]["source"] == "past run"
    assert "already on the host" in by_host["t4-box"]["parts_s"]["upload"]["detail"]
    assert all(f["source"] in SOURCES for f in figures(rows)), [f for f in figures(rows) if f["source"] not in SOURCES]

    # Among the paid hosts alone, the cheapest is recommended and the rest follow by cost.
    paid = cli.json("plan", "--data", str(dataset), *PLAN, "--host", "cloud-t4", "--host", "t4-box",
                    "--host", "cloud-4090", "--no-measure")
    assert [r["host"] for r in paid] == ["t4-box", "cloud-4090", "cloud-t4"] and paid[0]["recommended"]

    # What doctor finds on a host is kept, and plan says it came from there.
    checks = {c["check"]: c for c in cli.json("doctor", "t4-box")}
    assert checks["cpus"]["ok"] and checks["cpus"]["result"].split()[0].isdigit()
    ssh_host.start_machine()
    (after,) = cli.json("plan", "--data", str(dataset), *PLAN, "--host", "t4-box", "--no-measure")
    assert after["gpu"] == {"value": None, "source": "doctor", "detail": after["gpu"]["detail"]}
    assert "found no GPU" in after["gpu"]["detail"] and after["images_per_s"]["source"] == "past run"

    # The table a person reads fits 80 columns, and no host name in it is cut.
    text = cli("plan", "--data", str(dataset), *PLAN, "--no-measure", "--deadline", "1h", env={"COLUMNS": "80"},
               check=True).stdout
    lines = text.splitlines()
    assert max(map(len, lines)) <= 80, text
    for name in by_host:
        assert any(line.lstrip().startswith(name + " ") for line in lines), (name, text)

    # A second run on each CPU host takes what the plan said, within 25%; compare sets one against the other.
    for name in ("t4-box", "local"):
        run = cli.json("train", "--host", name, *FAST, "--epochs", "2", "--data", str(dataset))
        ssh_host.start_machine()
        actual = phase_span(gpu_run_home, run["run_id"])
        estimate = by_host[name]["total_s"]["value"]
        print(f"{name}: estimate {estimate:.2f} s, actual {actual:.2f} s")
        assert abs(estimate - actual) <= 0.25 * actual, (name, estimate, actual, by_host[name]["parts_s"])
        row = cli.json("compare", run["run_id"])["rows"][0]
        assert row["estimated_total_s"] == pytest.approx(estimate, abs=0.01)
        assert row["actual_total_s"] == pytest.approx(actual, abs=0.01)
        assert row["estimated_epoch_s"] == pytest.approx(by_host[name]["epoch_s"]["value"], abs=0.01)
