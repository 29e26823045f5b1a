"""AWS EC2: start a stopped instance, wait for it and for SSH, find its address, stop it."""

from __future__ import annotations

import time
from collections.abc import Callable

import boto3
import botocore.exceptions

from gpu_run.config import Host
from gpu_run.errors import BackendError, ConfigError
from gpu_run.providers.base import StopResult
from gpu_run.ui import UI

START_TIMEOUT_S = 600
STOP_CONFIRM_TIMEOUT_S = 120


def wait_for_state(
    describe: Callable[[], str],
    wanted: str,
    timeout_s: float,
    poll_s: float = 3,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> str:
    """Poll until describe() says `wanted`; a dead end (terminated) or the timeout is an error.

    sleep and clock are parameters so the loop can be tested against any sequence of states."""
    deadline = clock() + timeout_s
    while True:
        state = describe()
        if state == wanted:
            return state
        if state in ("terminated", "shutting-down") and wanted != state:
            raise BackendError(f"the instance is {state}; it cannot become {wanted}")
        if clock() >= deadline:
            raise BackendError(f"the instance is still {state} after {timeout_s:.0f}s (waiting for {wanted})")
        sleep(poll_s)


class AwsInstance:
    def __init__(self, host: Host):
        self.host = host
        self.instance_id = host.instance_id
        self.ec2 = boto3.client("ec2", region_name=host.region, endpoint_url=host.endpoint_url)

    def _call(self, what: str, fn, **kwargs):
        try:
            return fn(**kwargs)
        except botocore.exceptions.NoCredentialsError:
            raise ConfigError(
                "no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or a profile) in the environment or .env"
            ) from None
        except botocore.exceptions.EndpointConnectionError as e:
            raise BackendError(f"cannot reach EC2 in {self.host.region}: {e}") from None
        except botocore.exceptions.ClientError as e:
            err = e.response.get("Error", {})
            raise BackendError(
                f"EC2 {what} of {self.instance_id} failed: {err.get('Code')}: {err.get('Message')}"
            ) from None

    def describe(self) -> dict:
        reservations = self._call("describe", self.ec2.describe_instances, InstanceIds=[self.instance_id])[
            "Reservations"
        ]
        return reservations[0]["Instances"][0]

    def state(self) -> str:
        return self.describe()["State"]["Name"]

    def address(self) -> str:
        info = self.describe()
        address = info.get("PublicIpAddress") or info.get("PublicDnsName") or info.get("PrivateIpAddress")
        if not address:
            raise BackendError(f"instance {self.instance_id} has no address; give the host an ssh alias (bastion/VPN)")
        return address

    def shutdown_behaviour(self) -> str:
        attr = self._call(
            "attribute read",
            self.ec2.describe_instance_attribute,
            InstanceId=self.instance_id,
            Attribute="instanceInitiatedShutdownBehavior",
        )
        return attr.get("InstanceInitiatedShutdownBehavior", {}).get("Value", "stop")

    def start(self, ui: UI, timeout_s: float = START_TIMEOUT_S) -> None:
        state = self.state()
        if state == "running":
            ui.info(f"instance {self.instance_id} is already running")
        else:
            with ui.spinner(f"starting instance {self.instance_id} ({state})"):
                if state == "stopping":
                    wait_for_state(self.state, "stopped", timeout_s)
                self._call("start", self.ec2.start_instances, InstanceIds=[self.instance_id])
                wait_for_state(self.state, "running", timeout_s)
            ui.info(f"instance {self.instance_id} is running")
        if self.shutdown_behaviour() == "terminate":
            ui.warn(
                f"instance {self.instance_id} terminates when it shuts itself down: the watchdog's stop "
                f"would delete it and its disk. Set its shutdown behaviour to stop to keep them"
            )

    def stop(self, terminate: bool = False, timeout_s: float = STOP_CONFIRM_TIMEOUT_S) -> StopResult:
        """Stop (or terminate) and confirm through the API: EC2 bills nothing from `stopping` on."""
        if terminate:
            self._call("terminate", self.ec2.terminate_instances, InstanceIds=[self.instance_id])
        elif self.state() not in ("stopped", "stopping", "terminated"):
            self._call("stop", self.ec2.stop_instances, InstanceIds=[self.instance_id])
        asked = time.time()
        deadline = time.monotonic() + timeout_s
        done = ("shutting-down", "terminated") if terminate else ("stopping", "stopped", "terminated")
        while (state := self.state()) not in done:
            if time.monotonic() >= deadline:
                return StopResult(
                    False,
                    "unconfirmed",
                    None,
                    f"instance {self.instance_id} is still {state} {timeout_s:.0f}s after the stop request; it may still be billing",
                )
            time.sleep(3)
        verb = "terminated" if terminate else "stopped"
        return StopResult(
            True,
            "stopped",
            asked,
            f"instance {self.instance_id} {verb} ({state}; a stopped instance still bills for its disk)",
        )
