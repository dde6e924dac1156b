"""Moved to :mod:`aiwfe.testing.pods` (the installed toolkit); re-exported for the project's tests."""

from aiwfe.testing.pods import PodProcess, StartPods, dump_toml, run_pods, running, start_pod, wait_ready

__all__ = ["PodProcess", "StartPods", "dump_toml", "run_pods", "running", "start_pod", "wait_ready"]
