"""One log format for everything a pod or ``aiwfe up`` prints:

``2026-12-01 21:40:00,123 INFO gateway-1 aiwfe.pod: pod gateway ready: ...``

(time, level, the pod — ``up`` for the supervisor —, the logger, the message), on stderr.
Configured once by the CLI; libraries (Litestar, uvicorn) are kept from installing their
own handlers, so their records come out the same way.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["FORMAT", "setup"]

FORMAT = "%(asctime)s %(levelname)s %(pod)s %(name)s: %(message)s"


class _PodField(logging.Filter):
    def __init__(self, pod: str) -> None:
        super().__init__()
        self.pod = pod

    def filter(self, record: logging.LogRecord) -> bool:
        record.pod = self.pod
        return True


def setup(pod: str, *, verbose: bool = False) -> None:
    """Log every record of this process as :data:`FORMAT` with ``pod`` (or the label
    ``aiwfe up`` gave this replica in ``AIWFE_POD_LABEL``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(_PodField(os.environ.get("AIWFE_POD_LABEL") or pod))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
