"""The `gpu-run` command line: parse, call one function, render. Our errors are caught here, once."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from gpu_run import driver, run_commands
from gpu_run.cache import parse_cache_size
from gpu_run.config import load_config
from gpu_run.errors import GpuRunError
from gpu_run.ledger import Ledger
from gpu_run.paths import ledger_path
from gpu_run.run_end import Detached
from gpu_run.spec import TRAINER_ONLY_FIELDS, TrainSpec
from gpu_run.trainer import defaults as recipe
from gpu_run.ui import UI, listing, wide


class GpuRunGroup(click.Group):
    """Our errors are handled here, once, for every command: one line for an error the user can
    fix (the traceback only with --debug) and a non-zero exit."""

    def invoke(self, ctx: click.Context):
        debug = ctx.params.get("debug", False)
        try:
            return super().invoke(ctx)
        except Detached as d:
            Console(stderr=True).print(f"\nDetached from {d.run_id}; training goes on. Come back with: {d.hint}")
            sys.exit(0)
        except GpuRunError as e:
            if debug:
                raise
            UI().error(str(e))
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            if debug:
                raise
            UI().error("interrupted")
            sys.exit(130)


def json_option(help: str = "Print JSON only on stdout, for scripts."):
    return click.option("--json", "as_json", is_flag=True, help=help)


def open_ledger() -> Ledger:
    return Ledger(ledger_path())


def print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


# Exit codes of the commands that run or finish a run (documented in the README).
EXIT_FAILED = 1  # the training failed
EXIT_NOT_STOPPED = 3  # the training ended but its machine is not confirmed stopped: it may be billing


def render_result(ui: UI, result: dict, as_json: bool) -> None:
    """A run summary as JSON or as the closing lines; anything else as where the outputs are.
    Exits non-zero when the machine may still be billing."""
    if as_json:
        print_json(result)
    elif "exit_code" in result:
        print_summary(ui, result)
    elif "run_dir" in result:
        ui.info(f"outputs of {result['run_id']} ({result['status']}) are in {result['run_dir']}")
        if result.get("stop") and not result["stop"]["ok"]:
            ui.error(f"the machine is NOT confirmed stopped: {result['stop']['detail']}")
    if result.get("stop") and not result["stop"]["ok"]:
        sys.exit(EXIT_NOT_STOPPED)


def print_summary(ui: UI, s: dict) -> None:
    best = f"{s['best_val_acc'] * 100:.1f}%" if s.get("best_val_acc") is not None else "-"
    ui.info("")
    ui.info(
        f"run {s['run_id']}: {s['status']} (exit code {s['exit_code']}) on {s['host']} [{s['backend']}, {s['device']}]"
    )
    if (s.get("job") or {}).get("kind") == "command":
        metrics = f", epochs {s['epochs_completed']}, best val acc {best}" if s.get("epochs_completed") else ""
        ui.info(f"  command: {s['model']}{metrics}, {s['duration_s']:.1f}s")
    else:
        ui.info(
            f"  model {s['model']}, epochs {s['epochs_completed']}/{s['epochs']}, best val acc {best}, "
            f"{s['duration_s']:.1f}s"
        )
    ui.info(f"  outputs: {s['run_dir']}")
    if s.get("nodes"):
        ui.info(f"  nodes: {', '.join(s['nodes'])} (world size {s['world_size']}); each node's log in nodes/")
    cost = s["cost"]
    open_bill = not (s.get("stop") or {}).get("ok", True)
    ui.info(
        f"  cost: {cost['amount']:.2f} {cost['currency']} ({cost['billed_s']} s billed"
        + (", so far: still billing until the machine is confirmed stopped)" if open_bill else ")")
    )
    if s["status"] == "stopped":
        ui.info(f"  stopped with a resumable last.pth: gpu-run train --resume {s['run_id']} ...")
    stop = s.get("stop") or {}
    if stop.get("state"):
        ui.info(f"  machine: {stop['state']} ({stop['detail']})")
    if stop and not stop.get("ok", True):
        ui.error(
            f"the machine of run {s['run_id']} is NOT confirmed stopped and may still be billing: "
            f"{stop['detail']}. Check it in the provider's console; `gpu-run stop {s['run_id']}` tries again"
        )


def warn_not_stopped(records) -> None:
    """Runs whose machine may still be billing, said in red below any listing that shows them."""
    for r in records:
        UI().error(
            f"run {r.run_id} on {r.host}: machine NOT confirmed stopped ({r.stop_detail}); "
            f"`gpu-run stop {r.run_id}` tries again"
        )


def parse_env(pairs: tuple[str, ...]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise GpuRunError(f"--env {pair!r}: write it as KEY=VALUE")
        env[key] = value
    return env


@click.group(cls=GpuRunGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="gpu-run")
def cli(debug: bool) -> None:
    """Run a PyTorch training job on a GPU host and leave nothing running behind it."""
    if not debug:
        # paramiko prints the traceback of a connection cut mid-handshake (a machine going down)
        # from its own thread; the command says what that means in one line.
        logging.getLogger("paramiko").addHandler(logging.NullHandler())


@cli.command()
@click.option(
    "--host",
    default="local",
    show_default=True,
    help="Host name from gpu-run.toml, or the built-in local; box-a,box-b (or a [groups.NAME]) trains one job on all of them.",
)
@click.option("--data", type=click.Path(path_type=Path), help="ImageFolder dataset (train/<class>/, val/<class>/).")
@click.option("--model", default=recipe.MODEL, show_default=True, help="torchvision classification model.")
@click.option(
    "--weights",
    default=TrainSpec.weights,
    show_default=True,
    help="imagenet (torchvision's pretrained file, fetched once on this machine and sent to the host), none (from scratch), or a .pth file.",
)
@click.option("--epochs", type=int, default=recipe.EPOCHS, show_default=True)
@click.option("--batch-size", type=int, default=recipe.BATCH_SIZE, show_default=True)
@click.option("--lr", type=float, default=recipe.LR, show_default=True)
@click.option(
    "--step-size",
    type=int,
    default=recipe.STEP_SIZE,
    show_default=True,
    help="Multiply the lr by --gamma every this many epochs.",
)
@click.option("--gamma", type=float, default=recipe.GAMMA, show_default=True, help="LR decay factor.")
@click.option("--image-size", type=int, default=recipe.IMAGE_SIZE, show_default=True)
@click.option(
    "--augment",
    type=click.Choice(["standard", "light", "none"]),
    default=None,
    help="Training augmentation: standard (random crop, flip, colour jitter), light (milder crop and "
    "flip, for a short fine-tune on a small dataset) or none. Default: standard, or the resumed run's.",
)
@click.option(
    "--no-flip",
    is_flag=True,
    help="No random horizontal flip (digits, text, X-rays: data whose orientation has a meaning). A resumed run keeps its choice.",
)
@click.option(
    "--workers", type=int, default=recipe.WORKERS, help="Data loader processes (default: from the host's cores)."
)
@click.option("--seed", type=int, default=recipe.SEED, show_default=True)
@click.option(
    "--gpus", type=int, default=1, show_default=True, help="Processes/GPUs (per node); >1 runs DDP; 0 forces the CPU."
)
@click.option("--amp", type=click.Choice(["auto", "off"]), default=recipe.AMP, show_default=True)
@click.option(
    "--decode",
    type=click.Choice(["auto", "cpu", "gpu"]),
    default=recipe.DECODE,
    show_default=True,
    help="Where the host decodes JPEGs: on the GPU (nvjpeg) when auto measures it faster, or the CPU workers.",
)
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model.")
@click.option(
    "--cache-size",
    default="auto",
    show_default=True,
    metavar="N|auto",
    help="Train on a copy resized to short side N (made once, on this machine; 0: the originals). "
    "auto makes one, at the size training reads, when the images are much larger than that.",
)
@click.option("--detach", is_flag=True, help="Start and return at once; follow later with `gpu-run attach`.")
@click.option("--max-hours", type=float, default=0, help="Stop the job (and host) after this long; 0: no limit.")
@click.option("--silence-minutes", type=float, default=0, help="Stop a job that logs nothing this long; 0: never.")
@click.option(
    "--stop-timeout",
    type=int,
    default=TrainSpec.stop_timeout_s,
    show_default=True,
    help="Seconds the trainer gets to save last.pth when stopped before it is killed.",
)
@click.option(
    "--env", "env_vars", multiple=True, metavar="KEY=VALUE", help="Environment variable for the trainer (repeatable)."
)
@click.option("--keep-alive", is_flag=True, help="Do not run the host's stop command at the end.")
@click.option(
    "--terminate", is_flag=True, help="Cloud hosts: terminate the instance at the end instead of stopping it."
)
@click.option("--budget", type=float, default=0, help="Most to spend, in the host's currency; the host enforces it.")
@click.option(
    "--epoch-time", type=float, default=0, help="Seconds per epoch, for the budget estimate (default: measured)."
)
@click.option("--force", is_flag=True, help="Start even when the estimated cost is over --budget.")
@click.option("--accept-new-host-key", is_flag=True, help="Trust and remember an SSH host key never seen before.")
@click.option("--resume", metavar="RUN", help="Continue a stopped run from its last.pth.")
@click.option("--runs-dir", type=click.Path(path_type=Path), default=Path("runs"), show_default=True)
@click.option(
    "--hub-weights",
    default="",
    metavar="MODEL[,MODEL...]",
    help="Your own command: torchvision ImageNet weights to find in TORCH_HOME on the host (sent from here once), "
    "e.g. resnet18,resnet50.",
)
@click.option(
    "--max-pull-mb",
    type=int,
    default=TrainSpec.max_pull_mb,
    show_default=True,
    help="Your own command: the most its outputs may bring back; more stays on the host, said in one line.",
)
@click.option("--verbose", "-v", is_flag=True, help="Print how long each step took (on stderr).")
@json_option("Print the run summary as JSON, nothing else on stdout.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def train(
    ctx: click.Context,
    host,
    data,
    model,
    weights,
    epochs,
    batch_size,
    lr,
    step_size,
    gamma,
    image_size,
    augment,
    no_flip,
    workers,
    seed,
    gpus,
    amp,
    decode,
    compile_,
    cache_size,
    detach,
    max_hours,
    silence_minutes,
    stop_timeout,
    env_vars,
    keep_alive,
    terminate,
    budget,
    epoch_time,
    force,
    accept_new_host_key,
    resume,
    hub_weights,
    max_pull_mb,
    runs_dir,
    verbose,
    as_json,
    command,
) -> None:
    """Train on a host: check, build, run, follow, pull, record the cost. The job is the built-in
    trainer, or your own command after `--`, run in a copy of this folder on the host.

    \b
    gpu-run train --host t4-box --data ./photos --epochs 20
    gpu-run train --host t4-box --data ./photos -- python train.py --epochs 20 --data_dir ./photos
    """
    ledger = open_ledger()
    job_command = command_of(ctx, command)
    if data is None and job_command is None:
        if not resume:
            raise GpuRunError("missing --data DIR (a folder with train/<class>/ and val/<class>/)")
        data = Path(ledger.get_run(resume).data_path)
    if job_command is not None and data is None and resume and ledger.get_run(resume).data_path:
        data = Path(ledger.get_run(resume).data_path)
    spec = TrainSpec(
        host=host,
        data=data,
        model=model,
        weights=weights,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        step_size=step_size,
        gamma=gamma,
        image_size=image_size,
        augment=augment,
        no_flip=no_flip,
        workers=workers,
        seed=seed,
        gpus=gpus,
        amp=amp,
        decode=decode,
        compile=compile_,
        cache_size=parse_cache_size(cache_size),
        detach=detach,
        max_hours=max_hours,
        silence_minutes=silence_minutes,
        stop_timeout_s=stop_timeout,
        keep_alive=keep_alive,
        terminate=terminate,
        budget=budget,
        epoch_time_s=epoch_time,
        force=force,
        accept_new_host_key=accept_new_host_key,
        runs_dir=runs_dir,
        resume=resume,
        extra_env=parse_env(env_vars),
        command=job_command,
        project=Path.cwd() if job_command is not None else None,
        max_pull_mb=max_pull_mb,
        hub_weights=[m.strip() for m in hub_weights.split(",") if m.strip()],
    )
    ui = UI(quiet=as_json, verbose=verbose)
    summary = driver.train(spec, load_config(), ledger, ui)
    if as_json:
        print_json(summary)
    elif summary.get("status") != "detached":
        print_summary(ui, summary)
    if summary.get("status") == "failed":
        sys.exit(EXIT_FAILED)
    if not summary.get("stop", {}).get("ok", True):
        sys.exit(EXIT_NOT_STOPPED)


def command_of(ctx: click.Context, command: tuple[str, ...]) -> list[str] | None:
    """The user's command after `--`, or None for our trainer; refused in one line: `--` with
    nothing after it, words without `--`, and our trainer's options beside a command."""
    given_dashes = "--" in sys.argv[1:]
    if not command:
        if given_dashes:
            raise GpuRunError("nothing after --: give the command to run, e.g. -- python train.py --epochs 20")
        return None
    if not given_dashes:
        raise GpuRunError(
            f"unexpected {command[0]!r}: put your own command after --, "
            f"e.g. gpu-run train --host HOST -- python train.py"
        )
    from click.core import ParameterSource

    # click names the --compile flag compile_ (compile is a builtin)
    params = {name: "compile_" if name == "compile" else name for name in TRAINER_ONLY_FIELDS}
    mixed = [name for name, param in params.items() if ctx.get_parameter_source(param) == ParameterSource.COMMANDLINE]
    if mixed:
        option = "--" + mixed[0].replace("_", "-")
        raise GpuRunError(
            f"{option} is an option of the built-in trainer and does nothing for your own command; "
            f"pass it to your script after -- instead"
        )
    return list(command)


def grid_option(key: str, help: str):
    return click.option("--" + key.replace("_", "-"), key, metavar="V[,V...]", default=None, help=help)


SWEEP_COMMAND = "gpu_run.command"


class SweepGroup(click.Group):
    """`gpu-run sweep` has subcommands (status, list) and may end in `-- COMMAND`: the words after
    `--` are the user's command, kept aside before click looks for a subcommand among them."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            cut = args.index("--")
            ctx.meta[SWEEP_COMMAND] = args[cut + 1 :]
            args = args[:cut]
        return super().parse_args(ctx, args)


@cli.group(cls=SweepGroup, invoke_without_command=True)
@click.option(
    "--host", default="local", show_default=True, help="Host name from gpu-run.toml (one machine for every point)."
)
@click.option("--data", type=click.Path(path_type=Path), help="ImageFolder dataset (train/<class>/, val/<class>/).")
@click.option(
    "--grid", "grid_file", type=click.Path(path_type=Path), help="A TOML file: [grid] lists, or [[points]] tables."
)
@grid_option("model", f"torchvision model(s) [default: {recipe.MODEL}].")
@grid_option("weights", "imagenet | none | FILE.pth [default: imagenet].")
@grid_option("lr", f"[default: {recipe.LR}]")
@grid_option("batch_size", f"[default: {recipe.BATCH_SIZE}]")
@grid_option("epochs", f"[default: {recipe.EPOCHS}]")
@grid_option("image_size", f"[default: {recipe.IMAGE_SIZE}]")
@grid_option("augment", "standard | light | none.")
@grid_option("step_size", f"[default: {recipe.STEP_SIZE}]")
@grid_option("gamma", f"[default: {recipe.GAMMA}]")
@grid_option("seed", f"[default: {recipe.SEED}]")
@grid_option("gpus", "GPUs per point [default: 1]; 0 forces the CPU.")
@grid_option("amp", f"[default: {recipe.AMP}]")
@grid_option("decode", f"[default: {recipe.DECODE}]")
@grid_option("workers", "Data loader processes [default: from the host's cores].")
@click.option("--no-flip", is_flag=True, help="No horizontal flip in any point.")
@click.option(
    "--cache-size",
    default="auto",
    show_default=True,
    metavar="N|auto",
    help="As for train: one copy serves every point.",
)
@click.option("--parallel", type=int, default=None, help="Points side by side, each on its own GPU(s) [default: 1].")
@click.option("--budget", type=float, default=None, help="Most the whole sweep may spend, in the host's currency.")
@click.option(
    "--epoch-time", type=float, default=0, help="Seconds per epoch, for the budget estimate (default: measured)."
)
@click.option("--force", is_flag=True, help="Start even when the budget holds none of the points by the estimates.")
@click.option("--max-hours", type=float, default=0, help="Stop a point after this long; 0: no limit.")
@click.option("--silence-minutes", type=float, default=0, help="Stop a point that logs nothing this long; 0: never.")
@click.option(
    "--stop-timeout",
    type=int,
    default=TrainSpec.stop_timeout_s,
    show_default=True,
    help="Seconds a point gets to save last.pth when stopped.",
)
@click.option(
    "--env", "env_vars", multiple=True, metavar="KEY=VALUE", help="Environment variable for the trainer (repeatable)."
)
@click.option("--keep-alive", is_flag=True, help="Do not stop the host after the last point.")
@click.option(
    "--terminate", is_flag=True, help="Cloud hosts: terminate the instance at the end instead of stopping it."
)
@click.option("--detach", is_flag=True, help="Start the queue and return; `gpu-run sweep --resume SWEEP` follows it.")
@click.option("--accept-new-host-key", is_flag=True, help="Trust and remember an SSH host key never seen before.")
@click.option(
    "--resume", "resume_id", metavar="SWEEP", help="Finish a sweep: pull what ran, then run only what is unfinished."
)
@click.option("--runs-dir", type=click.Path(path_type=Path), default=Path("runs"), show_default=True)
@click.option(
    "--set",
    "set_values",
    multiple=True,
    metavar="NAME=V1,V2",
    help="Your own command: the values of its {NAME} placeholders, one point per combination (repeatable).",
)
@click.option("--verbose", "-v", is_flag=True, help="Print how long each step took (on stderr).")
@json_option("Print the sweep's result as JSON, nothing else on stdout.")
@click.pass_context
def sweep(
    ctx: click.Context,
    host,
    data,
    grid_file,
    no_flip,
    cache_size,
    parallel,
    budget,
    epoch_time,
    force,
    max_hours,
    silence_minutes,
    stop_timeout,
    env_vars,
    keep_alive,
    terminate,
    detach,
    accept_new_host_key,
    resume_id,
    runs_dir,
    set_values,
    verbose,
    as_json,
    **grid_values,
) -> None:
    """Train several points (a grid of train options) on one machine: one connect, sync and image
    build; the points queued on the host (the laptop may close); one stop after the last; each
    point's cost its share of the machine's; the comparison in runs/sweeps/<id>/. Or sweep your
    own command: its {NAME} placeholders filled from --set.

    \b
    gpu-run sweep --host t4-box --data ./photos --epochs 20 \\
        --model resnet18,resnet50,mobilenet_v3_large --lr 1e-3,1e-2
    gpu-run sweep --host t4-box --set lr=1e-3,1e-2 -- python train.py --lr {lr}
    """
    if ctx.invoked_subcommand is not None:
        return
    command = tuple(ctx.meta.get(SWEEP_COMMAND, ()))
    if command or set_values or SWEEP_COMMAND in ctx.meta:
        return sweep_command(
            ctx,
            command,
            set_values,
            host,
            data,
            grid_file,
            cache_size,
            parallel,
            budget,
            force,
            max_hours,
            silence_minutes,
            stop_timeout,
            env_vars,
            keep_alive,
            terminate,
            detach,
            accept_new_host_key,
            resume_id,
            runs_dir,
            verbose,
            as_json,
            grid_values,
        )
    from gpu_run.sweep import grid
    from gpu_run.sweep import run as sweeps

    ui = UI(quiet=as_json, verbose=verbose)
    ledger, config = open_ledger(), load_config()
    if resume_id:
        given = [k for k, v in grid_values.items() if v is not None] + (["grid"] if grid_file else [])
        if given:
            raise GpuRunError(f"--resume runs the sweep's own points; leave out --{given[0].replace('_', '-')}")
        result = sweeps.resume(
            resume_id,
            config,
            ledger,
            ui,
            parse_env(env_vars),
            parallel=parallel,
            budget=budget,
            detach=detach,
            force=force,
        )
    else:
        if data is None:
            raise GpuRunError("missing --data DIR (a folder with train/<class>/ and val/<class>/)")
        shared, points = grid.build_points(grid_values, grid_file)
        base = TrainSpec(
            host=host,
            data=data,
            **shared,
            no_flip=no_flip,
            cache_size=parse_cache_size(cache_size),
            detach=detach,
            max_hours=max_hours,
            silence_minutes=silence_minutes,
            stop_timeout_s=stop_timeout,
            keep_alive=keep_alive,
            terminate=terminate,
            budget=budget or 0.0,
            epoch_time_s=epoch_time,
            force=force,
            accept_new_host_key=accept_new_host_key,
            runs_dir=runs_dir,
            extra_env=parse_env(env_vars),
        )
        result = sweeps.sweep(base, points, parallel or 1, config, ledger, ui)
    render_sweep(ui, result, as_json)


def sweep_command(
    ctx: click.Context,
    command,
    set_values,
    host,
    data,
    grid_file,
    cache_size,
    parallel,
    budget,
    force,
    max_hours,
    silence_minutes,
    stop_timeout,
    env_vars,
    keep_alive,
    terminate,
    detach,
    accept_new_host_key,
    resume_id,
    runs_dir,
    verbose,
    as_json,
    grid_values,
) -> None:
    """`gpu-run sweep --set NAME=a,b -- COMMAND`: the points fill the command's placeholders."""
    from gpu_run.sweep import grid
    from gpu_run.sweep import run as sweeps

    job_command = command_of(ctx, command)
    if job_command is None:
        raise GpuRunError(
            "--set fills the placeholders of your own command: give it after --, e.g. -- python train.py --lr {lr}"
        )
    given = [k for k, v in grid_values.items() if v is not None] + (["grid"] if grid_file else [])
    if given:
        raise GpuRunError(
            f"--{given[0].replace('_', '-')} varies the built-in trainer; with your own command, "
            f"vary its arguments with --set NAME=a,b and {{NAME}} in the command"
        )
    if resume_id:
        raise GpuRunError(
            f"`gpu-run sweep --resume {resume_id}` runs the sweep's own command again; leave out the command"
        )
    points = grid.command_points(tuple(set_values), job_command)
    base = TrainSpec(
        host=host,
        data=data,
        cache_size=parse_cache_size(cache_size),
        detach=detach,
        max_hours=max_hours,
        silence_minutes=silence_minutes,
        stop_timeout_s=stop_timeout,
        keep_alive=keep_alive,
        terminate=terminate,
        budget=budget or 0.0,
        force=force,
        accept_new_host_key=accept_new_host_key,
        runs_dir=runs_dir,
        extra_env=parse_env(env_vars),
        command=job_command,
        project=Path.cwd(),
    )
    ui = UI(quiet=as_json, verbose=verbose)
    result = sweeps.sweep(base, points, parallel or 1, load_config(), open_ledger(), ui)
    render_sweep(ui, result, as_json)


def render_sweep(ui: UI, result: dict, as_json: bool) -> None:
    """The points' table and where the comparison is; exits non-zero when the machine may still bill."""
    if as_json:
        print_json(result)
    elif result.get("status") == "detached":
        ui.info(f"sweep {result['sweep_id']} runs on; follow it with: gpu-run sweep --resume {result['sweep_id']}")
    else:
        print_sweep(ui, result)
    if result.get("stop") and not result["stop"]["ok"]:
        sys.exit(EXIT_NOT_STOPPED)
    if result.get("status") == "failed":
        sys.exit(EXIT_FAILED)


def print_sweep(ui: UI, result: dict) -> None:
    table = listing("#", "point", "status", title=f"sweep {result['sweep_id']} on {result['host']}: {result['status']}")
    for column in ("best acc", "img/s", "s/epoch", f"cost {result['cost']['currency']}"):
        table.add_column(column, justify="right")
    table.add_column("run", no_wrap=True)
    for p in result["points"]:
        table.add_row(
            str(p["point"]),
            p["label"],
            p["status"],
            "-" if p.get("best_val_acc") is None else f"{p['best_val_acc'] * 100:.1f}%",
            "-" if p.get("images_per_s") is None else f"{p['images_per_s']:.1f}",
            "-" if p.get("epoch_time_s") is None else f"{p['epoch_time_s']:.1f}",
            "-" if p.get("cost") is None else f"{p['cost']:.2f}",
            p.get("run_id") or "-",
        )
    ui.console.print(table)
    ui.info(
        f"total: {result['cost']['amount']:.2f} {result['cost']['currency']}, the machine's billed time split between the points"
    )
    if result.get("report"):
        ui.info(f"comparison: {result['report']['markdown']} and {result['report']['figure']}")
    unfinished = [p for p in result["points"] if p["status"] != "succeeded"]
    if unfinished and result["status"] != "running":
        ui.info(f"{len(unfinished)} point(s) unfinished: gpu-run sweep --resume {result['sweep_id']} runs them")
    if result.get("stop") and not result["stop"]["ok"]:
        ui.error(
            f"the machine of sweep {result['sweep_id']} is NOT confirmed stopped and may still be billing: "
            f"{result['stop']['detail']}"
        )


@sweep.command("status")
@click.argument("sweep_id", metavar="SWEEP")
@json_option()
def sweep_status(sweep_id: str, as_json: bool) -> None:
    """Each point's state and cost (from the machine too, while a round runs there)."""
    from gpu_run.sweep import run as sweeps

    ui = UI(quiet=as_json)
    result = sweeps.live_status(sweep_id, load_config(), open_ledger(), ui)
    if as_json:
        print_json(result)
    else:
        print_sweep(ui, result)


@sweep.command("list")
@json_option()
def sweep_list(as_json: bool) -> None:
    """The sweeps in the ledger, newest first."""
    from gpu_run.sweep import run as sweeps

    ledger = open_ledger()
    rows = [sweeps.sweep_status(sw, ledger) for sw in ledger.list_sweeps(limit=50)]
    if as_json:
        print_json(rows)
        return
    table = listing("sweep", "host", "status")
    table.add_column("points", justify="right")
    table.add_column("cost", justify="right")
    for r in rows:
        done = sum(p["status"] == "succeeded" for p in r["points"])
        table.add_row(
            r["sweep_id"],
            r["host"],
            r["status"],
            f"{done}/{len(r['points'])}",
            f"{r['cost']['amount']:.2f} {r['cost']['currency']}",
        )
    UI().console.print(table)


@cli.command()
@click.argument("run_id")
@json_option()
def attach(run_id: str, as_json: bool) -> None:
    """Re-attach the live display to a running job, then pull its outputs."""
    ui = UI(quiet=as_json)
    render_result(ui, run_commands.attach(run_id, load_config(), open_ledger(), ui), as_json)


@cli.command()
@click.argument("target", metavar="RUN|SWEEP|HOST")
@click.option("--terminate", is_flag=True, help="With a cloud HOST: terminate instead of stop.")
@json_option()
def stop(target: str, terminate: bool, as_json: bool) -> None:
    """Stop a run (the trainer saves a resumable last.pth, outputs are pulled, the host stops),
    a sweep (its running point likewise, no more start), or a cloud HOST's instance by name."""
    ui = UI(quiet=as_json)
    config = load_config()
    host = config.hosts.get(target)
    if host is not None:
        if host.kind != "aws":
            raise GpuRunError(f"host {target} is not a cloud instance gpu-run can stop; stop a run by its id")
        from gpu_run.providers.aws import AwsInstance

        instance = AwsInstance(host)
        instance.stop(terminate=terminate)
        state = instance.state()
        if as_json:
            print_json({"host": target, "instance_id": host.instance_id, "state": state})
        else:
            ui.info(f"instance {host.instance_id} of {target}: {state} (a stopped instance still bills for its disk)")
        return
    if target.startswith("sweep-"):
        from gpu_run.sweep import run as sweeps

        render_sweep(ui, sweeps.stop_sweep(target, config, open_ledger(), ui), as_json)
        return
    render_result(ui, run_commands.stop(target, config, open_ledger(), ui), as_json)


@cli.command()
@click.argument("run_id")
@click.option(
    "--max-pull-mb",
    type=int,
    default=None,
    help="Your own command's run: raise the most its outputs may bring back (what the cap left on the host).",
)
@json_option()
def pull(run_id: str, max_pull_mb: int | None, as_json: bool) -> None:
    """Fetch a run's outputs into runs/<run-id>/ (each file transferred intact); finishes a run
    whose job has ended."""
    ui = UI(quiet=as_json)
    ledger = open_ledger()
    if max_pull_mb is not None:
        from gpu_run.outputs import set_pull_cap

        if max_pull_mb < 1:
            raise GpuRunError(f"--max-pull-mb must be at least 1, got {max_pull_mb}")
        set_pull_cap(Path(ledger.get_run(run_id).run_dir), max_pull_mb)
    render_result(ui, run_commands.pull(run_id, load_config(), ledger, ui), as_json)


@cli.command()
@click.argument("host_name", metavar="HOST|HOST,HOST...|GROUP")
@click.option("--accept-new-host-key", is_flag=True, help="Trust and remember an SSH host key never seen before.")
@json_option()
def doctor(host_name: str, accept_new_host_key: bool, as_json: bool) -> None:
    """Check a host: SSH login, Docker, NVIDIA runtime and GPUs, free disk, rsync, clock offset.
    For several hosts (box-a,box-b or a [groups.NAME]): each one, then the rendezvous port, the
    torch/CUDA versions and the network interface NCCL will use."""
    from gpu_run.doctor import check_target

    checks = check_target(load_config(), host_name, accept_new_host_key)
    if as_json:
        print_json(checks)
    else:
        table = listing("check")
        table.add_column("result", overflow="fold")
        table.add_column("")
        for c in checks:
            verdict = (
                Text("ok", style="green")
                if c["ok"]
                else Text("problem" if c["required"] else "warning", style="red" if c["required"] else "yellow")
            )
            table.add_row(Text(c["check"]), Text(c["result"]), verdict)
        Console().print(table)
    if not all(c["ok"] for c in checks if c["required"]):
        sys.exit(1)


@cli.command()
@click.argument("run_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until the run ends.")
def logs(run_id: str, follow: bool) -> None:
    """Print a run's trainer log."""
    from gpu_run.host_text import safe

    for line in run_commands.log_lines(run_id, follow, load_config(), open_ledger(), UI()):
        if not line.endswith("\r"):  # a progress bar's redraws: only its last state is a line
            click.echo(safe(line))


@cli.command()
@click.argument("run_id")
@json_option()
def status(run_id: str, as_json: bool) -> None:
    """A run's state, phases and latest metrics (live from its host when it runs)."""
    state = run_commands.live_status(run_id, load_config(), open_ledger(), UI(quiet=True))
    if as_json:
        print_json(state)
        return
    console = Console(highlight=False)
    # Host names, trainer states and paths are the user's text: escaped, so a `[` is never markup.
    console.print(
        f"run {escape(state['run_id'])} on {escape(state['host'])} \\[{escape(str(state['backend']))}]: "
        f"[bold]{escape(state['status'])}[/bold]"
    )
    if "trainer" in state:
        console.print(f"  trainer: {state['trainer']}", markup=False)
    for node in state.get("nodes") or []:  # a multi-node run
        end = node.get("trainer") or (f"exit code {node['exit_code']}" if node["exit_code"] is not None else "-")
        console.print(
            f"  node {node['node']} {node['host']}{' (rank 0)' if node['rank0'] else ''}: {end}; "
            f"machine {node['stop']['state'] or 'up'}",
            markup=False,
        )
    if state.get("best_val_acc") is not None:
        console.print(f"  best val acc {state['best_val_acc'] * 100:.1f}%")
    if "last_epoch" in state:
        e = state["last_epoch"]
        console.print(f"  last epoch {e['epoch']}: val acc {e['val_acc'] * 100:.1f}%, train loss {e['train_loss']:.4f}")
    table = listing("phase", "status", "started", "duration")
    for p in state["phases"]:
        table.add_row(
            p["phase"],
            p["status"],
            when(p["started_at"]),
            f"{p['duration_s']:.1f}s" if p["duration_s"] is not None else "running",
        )
    console.print(table)
    console.print(f"  outputs: {state['run_dir']}", markup=False)
    stop = state.get("stop") or {}
    if stop.get("state"):
        console.print(
            f"  machine: {stop['state']} ({stop['detail']})", markup=False, style=None if stop["ok"] else "bold red"
        )
    if stop and not stop["ok"]:
        UI().error(
            f"the machine is NOT confirmed stopped and may still be billing; `gpu-run stop {state['run_id']}` tries again"
        )


@cli.command()
@click.option("--host", help="Only runs on this host.")
@click.option("--limit", type=int, default=50, show_default=True)
@json_option()
def runs(host: str | None, limit: int, as_json: bool) -> None:
    """List recorded runs, newest first."""
    records = open_ledger().list_runs(host=host, limit=limit)
    if as_json:
        print_json(
            [
                {
                    "run_id": r.run_id,
                    "host": r.host,
                    "model": r.model,
                    "status": r.status,
                    "exit_code": r.exit_code,
                    "created_at": r.created_at,
                    "ended_at": r.ended_at,
                    "best_val_acc": r.best_val_acc,
                    "cost": r.cost_amount,
                    "currency": r.currency,
                    "run_dir": r.run_dir,
                    "stop": {"ok": not r.stop_failed, "state": r.stop_status, "detail": r.stop_detail},
                }
                for r in records
            ]
        )
        return
    console = Console()
    table = listing("run", "model", "status")
    table.add_column("host", overflow="fold", min_width=8)
    if wide(console):
        table.add_column("started")
    table.add_column("acc", justify="right")
    # One currency (the usual case) goes in the header, so the amounts stay narrow.
    currencies = {r.currency for r in records if r.cost_amount is not None}
    single = currencies.pop() if len(currencies) == 1 else None
    table.add_column(f"cost {single}" if single else "cost", justify="right")
    for r in records:
        acc = f"{r.best_val_acc * 100:.1f}%" if r.best_val_acc is not None else "-"
        cost = "-" if r.cost_amount is None else f"{r.cost_amount:.2f}" + ("" if single else f" {r.currency}")
        status = Text(r.status)
        if r.stop_failed:
            status.append("\nNOT STOPPED", style="bold red")  # its own line: the row stays narrow
        cells = [Text(r.run_id), Text(r.model or "-"), status, Text(r.host)]
        if wide(console):
            cells.append(Text(when(r.created_at)))
        table.add_row(*cells, acc, cost)
    console.print(table)
    warn_not_stopped([r for r in records if r.stop_failed])


@cli.group(invoke_without_command=True)
@json_option()
@click.pass_context
def hosts(ctx: click.Context, as_json: bool) -> None:
    """List the configured hosts (gpu-run.toml) and the built-in local host; `hosts add` adds one."""
    if ctx.invoked_subcommand is not None:
        return
    config = load_config()
    rows = [
        {
            "name": h.name,
            "kind": h.kind,
            "address": h.ssh or h.instance_id or "local Docker engine",
            "price_per_hour": h.price_per_hour,
            "currency": h.currency,
            "billing": h.billing,
            "stop_command": h.stop_command,
        }
        for h in config.hosts.values()
    ]
    if as_json:
        print_json(rows)
        return
    table = listing("host", "kind")
    for column in ("address", "price/hour", "billing", "stop command"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(
            *(
                Text(v)
                for v in (
                    r["name"],
                    r["kind"],
                    r["address"],
                    f"{r['price_per_hour']:.2f} {r['currency']}",
                    r["billing"],
                    r["stop_command"] or "-",
                )
            )
        )
    Console().print(table)
    Console(stderr=True).print(f"config: {config.source or 'none (built-in local host only)'}", markup=False)


@hosts.command("add")
@click.argument("name")
@click.option(
    "--ssh-command",
    required=True,
    metavar='"ssh -p PORT user@host"',
    help="The SSH command the rental console shows (AutoDL, vast.ai, RunPod).",
)
@click.option("--preset", help="Platform defaults: autodl, runpod or vastai.")
@click.option("--password-stdin", is_flag=True, help="Read the console's password from the first line of stdin.")
@click.option("--accept-new-host-key", is_flag=True, help="Trust the host key without asking (compare it yourself).")
@click.option("--price-per-hour", type=float, help="What the machine costs per hour, in the preset's currency.")
@json_option("Print the new host as JSON, nothing else on stdout.")
def hosts_add(
    name: str,
    ssh_command: str,
    preset: str | None,
    password_stdin: bool,
    accept_new_host_key: bool,
    price_per_hour: float | None,
    as_json: bool,
) -> None:
    """Add a rented host from its console's SSH command: install this laptop's key (asking for the
    password once), record its host key, append [hosts.NAME] to gpu-run.toml."""
    from gpu_run import onboard

    result = onboard.add_host(
        name,
        ssh_command,
        preset=preset,
        price_per_hour=price_per_hour,
        accept_new_host_key=accept_new_host_key,
        get_password=onboard.password_source(password_stdin),
        confirm_host_key=onboard.confirm_on_terminal,
        ui=UI(quiet=as_json),
    )
    if as_json:
        print_json(result)


@cli.command()
@json_option()
@click.option("--csv", "as_csv", is_flag=True)
def cost(as_json: bool, as_csv: bool) -> None:
    """What every run cost: billed time, idle after the job, amount; totals per host and month."""
    from gpu_run.money.report import cost_rows, totals

    rows = cost_rows(open_ledger(), load_config())
    by_host, by_month = totals(rows, "host"), totals(rows, "month")
    if as_json:
        print_json({"runs": rows, "per_host": by_host, "per_month": by_month})
        return
    if as_csv:
        import csv as csv_module

        w = csv_module.DictWriter(sys.stdout, fieldnames=list(rows[0]) if rows else ["run_id"])
        w.writeheader()
        w.writerows(rows)
        return
    console = Console(highlight=False)
    table = listing("run", title="runs")
    table.add_column("host", overflow="fold")
    if wide(console):
        table.add_column("started")
    for column in ("billed", "idle after", "amount"):
        table.add_column(column, justify="right", overflow="fold")
    for r in rows:
        amount = Text(f"{r['amount']:.2f} {r['currency']}" + (" so far" if r["so_far"] else ""))
        if r["stop_failed"]:
            amount.append(" NOT STOPPED", style="bold red")
        cells = [Text(r["run_id"]), Text(r["host"])] + ([Text(r["started"])] if wide(console) else [])
        table.add_row(*cells, f"{r['billed_s']} s", f"{r['idle_after_job_s']:.0f} s", amount)
    console.print(table)
    for title, data, key in (("per host", by_host, "host"), ("per month", by_month, "month")):
        t = listing(key, title=title)
        t.add_column("runs", justify="right")
        t.add_column("amount", justify="right")
        for d in data:
            t.add_row(Text(d[key]), str(d["runs"]), f"{d['amount']:.2f} {d['currency']}")
        console.print(t)
    warn_not_stopped([open_ledger().get_run(r["run_id"]) for r in rows if r["stop_failed"]])
    if any(r["cloud"] for r in rows):
        from gpu_run.money.prices import PRICES_TAKEN

        console.print("Stopped cloud instances still bill for their disks (EBS); that is not in these amounts.")
        console.print(f"Cloud prices without price_per_hour come from the shipped table, taken {PRICES_TAKEN}.")


def run_dir_of(run_id: str) -> tuple[str, Path]:
    run = open_ledger().get_run(run_id)
    return run.run_id, Path(run.run_dir or "")


@cli.command()
@click.argument("run_id")
@click.option("--data", type=click.Path(path_type=Path), help="Dataset folder, if it moved (for the mistakes grid).")
@json_option()
def report(run_id: str, data: Path | None, as_json: bool) -> None:
    """Draw the thesis figures and report.md into runs/<run-id>/report/."""
    from gpu_run.deliverables.report import write_report

    run = open_ledger().get_run(run_id)
    ui = UI(quiet=as_json)
    with ui.spinner("drawing figures"):
        out = write_report(Path(run.run_dir), data or (Path(run.data_path) if run.data_path else None))
    files = sorted(str(p) for p in out.iterdir())
    if as_json:
        print_json({"run_id": run.run_id, "report_dir": str(out), "files": files})
    else:
        ui.info(f"report written to {out}/report.md")
        for f in files:
            ui.info(f"  {f}")


@cli.command()
@click.argument("run_ids", nargs=-1, required=True, metavar="RUN...")
@click.option("--out", type=click.Path(path_type=Path), help="Folder for compare.csv/.md and the figure.")
@json_option()
def compare(run_ids: tuple[str, ...], out: Path | None, as_json: bool) -> None:
    """Tabulate runs against each other: model, parameters, accuracy, speed, cost."""
    from gpu_run.deliverables.compare import run_row, write_comparison

    rows = [run_row(*run_dir_of(r)) for r in run_ids]
    out = out or Path("runs") / f"compare-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    files = write_comparison(rows, out)
    if as_json:
        print_json({"rows": rows, "files": {k: str(v) for k, v in files.items()}})
        return
    from gpu_run.deliverables.compare import comparison_table

    Console().print(comparison_table(rows))  # every cell the host's text, shown literally
    for r in rows:  # what `gpu-run plan` said before the run, against what it took
        if r.get("estimated_total_s") and r.get("actual_total_s"):
            off = (r["estimated_total_s"] - r["actual_total_s"]) / r["actual_total_s"] * 100
            UI().info(
                f"{r['run']}: planned {r['estimated_total_s']:.0f} s in all, took {r['actual_total_s']:.0f} s "
                f"({off:+.0f}%); an epoch {r.get('estimated_epoch_s') or 0:.1f} s planned, "
                f"{r.get('actual_epoch_s') or 0:.1f} s actual"
            )
    UI().info(f"written: {files['markdown']}, {files['csv']}, {files['figure']}")


@cli.command()
@click.argument("run_id")
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("--top", type=int, default=3, show_default=True)
@click.option("--export", "export_format", type=click.Choice(["onnx", "torchscript"]), help="Write a deployable model.")
@json_option()
def predict(run_id: str, images: tuple[Path, ...], top: int, export_format: str | None, as_json: bool) -> None:
    """Classify images with the run's best checkpoint on this machine's CPU."""
    from gpu_run.deliverables import predict as predictor

    if top < 1:
        raise GpuRunError(f"--top must be at least 1, got {top}")
    _, run_dir = run_dir_of(run_id)
    if not images and not export_format:
        raise GpuRunError("give IMAGE paths to classify, or --export onnx|torchscript")
    results = predictor.predict(run_dir, list(images), top) if images else []
    exported = str(predictor.export(run_dir, export_format)) if export_format else None
    if as_json:
        print_json({"predictions": results, "exported": exported})
        return
    for r in results:
        best = ", ".join(f"{t['class']} {t['probability'] * 100:.1f}%" for t in r["top"])
        click.echo(f"{r['image']}: {best}")
    if exported:
        UI().info(f"exported {exported}")


@cli.group()
def image() -> None:
    """The trainer image and its offline CPU base."""


@image.command("build-base")
def image_build_base() -> None:
    """Build gpu-run-base:cpu on the local engine without a registry (debootstrap, about 2 minutes)."""
    from gpu_run.image import CPU_BASE_IMAGE, build_cpu_base, connect, image_exists

    client = connect()
    if client is None:
        raise GpuRunError("no Docker engine reachable: start dockerd (or Docker Desktop) first")
    ui = UI()
    if image_exists(client, CPU_BASE_IMAGE):
        ui.info(f"{CPU_BASE_IMAGE} already exists")
        return
    build_cpu_base(ui)


@cli.command("demo-data")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--classes", type=int, default=2, show_default=True)
@click.option("--train-per-class", type=int, default=150, show_default=True)
@click.option("--val-per-class", type=int, default=50, show_default=True)
@click.option("--size", type=int, default=64, show_default=True, help="Image side in pixels.")
@click.option("--seed", type=int, default=recipe.SEED, show_default=True)
def demo_data(path: Path, classes: int, train_per_class: int, val_per_class: int, size: int, seed: int) -> None:
    """Write a small generated ImageFolder dataset (textures a CNN learns in an epoch or two)."""
    from gpu_run.demo_data import check_options, make_dataset

    check_options(classes, train_per_class, val_per_class, size)
    if path.exists() and not path.is_dir():
        raise GpuRunError(f"{path} is a file; give a new or empty folder for the dataset")
    if path.exists() and any(path.iterdir()):
        UI().info(f"{path} already exists; keeping it")
        return
    try:
        make_dataset(path, classes, train_per_class, val_per_class, size, seed)
    except OSError as e:
        raise GpuRunError(f"cannot write the dataset to {path}: {e.strerror}; give a folder you can write") from None
    UI().info(f"wrote {classes} classes x ({train_per_class} train + {val_per_class} val) images to {path}")


@cli.command("plan")
@click.option(
    "--data", type=click.Path(path_type=Path), required=True, help="ImageFolder dataset (train/<class>/, val/<class>/)."
)
@click.option("--epochs", type=int, default=recipe.EPOCHS, show_default=True)
@click.option("--model", default=recipe.MODEL, show_default=True, help="torchvision classification model.")
@click.option("--image-size", type=int, default=recipe.IMAGE_SIZE, show_default=True)
@click.option("--batch-size", type=int, default=recipe.BATCH_SIZE, show_default=True)
@click.option(
    "--cache-size",
    default="auto",
    show_default=True,
    metavar="N|auto",
    help="Plan for training on a copy resized to short side N (0: the originals), as train does; "
    "auto: a copy at the size training reads, when the images are much larger than that.",
)
@click.option(
    "--augment",
    type=click.Choice(["standard", "light", "none"]),
    default="standard",
    show_default=True,
    help="The training augmentation (it sets how much of each image is decoded).",
)
@click.option("--deadline", metavar="DURATION", help="When the run must be done: 6h, 90m, 1h30m, 2d.")
@click.option("--budget", type=float, help="Most to spend, in each host's own currency.")
@click.option(
    "--uplink", type=float, metavar="MBIT", help="Your upload speed in Mbit/s (default: measured by your last sync)."
)
@click.option("--host", "only_hosts", multiple=True, metavar="HOST", help="Plan for this host only (repeatable).")
@click.option("--no-measure", is_flag=True, help="Do not time decoding or CPU training here (faster, fewer figures).")
@json_option("Print the rows as JSON (each figure with its source), nothing else on stdout.")
def plan_command(
    data,
    epochs,
    model,
    image_size,
    batch_size,
    cache_size,
    augment,
    deadline,
    budget,
    uplink,
    only_hosts,
    no_measure,
    as_json,
) -> None:
    """Which host finishes before the deadline for the least money: time per epoch and in all, cost,
    and what limits each (GPU, the host's CPUs decoding images, or the upload)."""
    from gpu_run.cache import parse_cache_size
    from gpu_run.plan import gather, render

    request = gather.PlanRequest(
        data=data,
        model=model,
        epochs=epochs,
        image_size=image_size,
        batch_size=batch_size,
        cache_size=parse_cache_size(cache_size),
        augment=augment,
        deadline=deadline,
        budget=budget,
        uplink_mbit=uplink,
        hosts=only_hosts,
        measure=not no_measure,
    )

    def ask_uplink() -> float | None:  # asked once, when nothing measured it, and only of a person
        if as_json or not sys.stdin.isatty():
            return None
        return click.prompt("Your upload speed in Mbit/s (a speed test's 'upload'; asked once)", type=float)

    rows, job = gather.make_plan(request, load_config(), open_ledger(), UI(quiet=as_json), ask_uplink)
    if as_json:
        print_json([r.as_json() for r in rows])
    else:
        render.print_plan(rows, job, gather.check_request(request), budget)


@cli.command()
@click.option("--port", type=int, default=8765, show_default=True, help="Port on 127.0.0.1 (0: any free port).")
@click.option("--open", "open_browser", is_flag=True, help="Open the page in the browser.")
def dashboard(port: int, open_browser: bool) -> None:
    """A web page on 127.0.0.1 for every run: live curves, cost, machines still billing. It stops
    or pulls a run only when you confirm that on the page; Ctrl-C ends it."""
    from gpu_run.dashboard.app import serve

    serve(port, open_browser)


# One example line at the end of each command's --help, as the best CLIs have (one place for all).
EXAMPLES = {
    "": "gpu-run train --host autodl --data ./gender_dataset --epochs 20",
    "train": "gpu-run train --host autodl --data ./gender_dataset -- python train.py --data_dir ./gender_dataset",
    "attach": "gpu-run attach 20261203-101500-ab12",
    "stop": "gpu-run stop 20261203-101500-ab12",
    "pull": "gpu-run pull 20261203-101500-ab12 --max-pull-mb 4096",
    "logs": "gpu-run logs 20261203-101500-ab12 -f",
    "status": "gpu-run status 20261203-101500-ab12",
    "runs": "gpu-run runs --host autodl",
    "cost": "gpu-run cost --csv > costs.csv",
    "doctor": "gpu-run doctor autodl",
    "hosts": "gpu-run hosts",
    "hosts add": 'gpu-run hosts add autodl --ssh-command "ssh -p 38921 root@connect.westb.seetacloud.com" --preset autodl',
    "plan": "gpu-run plan --data ./gender_dataset --epochs 20 --deadline 6h --budget 30",
    "report": "gpu-run report 20261203-101500-ab12",
    "compare": "gpu-run compare 20261203-101500-ab12 20261203-121500-cd34",
    "predict": "gpu-run predict 20261203-101500-ab12 photo.jpg --export onnx",
    "sweep": "gpu-run sweep --host autodl --data ./photos --model resnet18,resnet50 --lr 1e-3,1e-2",
    "sweep status": "gpu-run sweep status sweep-20261203-101500-ab12",
    "sweep list": "gpu-run sweep list",
    "image build-base": "gpu-run image build-base",
    "image": "gpu-run image build-base",
    "demo-data": "gpu-run demo-data ./demo-data",
    "dashboard": "gpu-run dashboard --open",
}


def add_examples(group: click.Group, prefix: str = "") -> None:
    for name, command in group.commands.items():
        key = f"{prefix} {name}".strip()
        if key in EXAMPLES:
            command.epilog = f"Example: {EXAMPLES[key]}"
        if isinstance(command, click.Group):
            add_examples(command, key)


cli.epilog = f"Example: {EXAMPLES['']}"
add_examples(cli)


def main() -> None:
    cli(prog_name="gpu-run")


if __name__ == "__main__":
    main()
