"""How the trainer runs on a machine reached over SSH: in our image on its Docker engine
(runtimes.docker), or as a process group in its own Python (runtimes.python: container instances
such as AutoDL, vast.ai and RunPod, where Docker cannot run). The SSH host backend drives either
through the same small interface (runtimes.base.Runtime)."""
