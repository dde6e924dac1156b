"""The ``stress`` mix as a locust file, kept to compare locust with the asyncio driver.

Not used by ``aiwfe loadtest`` (locust is not a dependency). PERFORMANCE.md gives the
comparison and the command::

    pip install locust
    locust -f bench/_load_locustfile.py --headless -u 500 -r 500 --run-time 40s --host http://127.0.0.1:PORT

Each user registers (``setup:`` requests, not part of the figures), logs in, submits one helios
job and reads its status, then stops: the shape of ``aiwfe loadtest stress`` (500 × 3).
"""

from __future__ import annotations

import uuid
from typing import Any

from locust import task  # type: ignore[import-not-found]
from locust.contrib.fasthttp import FastHttpUser  # type: ignore[import-not-found]
from locust.exception import StopUser  # type: ignore[import-not-found]

__all__ = ["StressUser"]

PASSWORD = "load-test password 1"


class StressUser(FastHttpUser):  # type: ignore[misc]
    """Login, job submit, job status (see the module docstring)."""

    def on_start(self) -> None:
        self.name_ = f"loc{uuid.uuid4().hex[:12]}"
        body = {"username": self.name_, "password": PASSWORD}
        self.client.post("/v1/auth/register", json=body, name="setup:register")

    @task
    def mix(self) -> None:
        body = {"username": self.name_, "password": PASSWORD}
        r: Any = self.client.post("/v1/auth/login", json=body, name="login")
        if r.status_code != 200:
            raise StopUser
        h = {"Authorization": f"Bearer {r.json()['access_token']}"}
        job = {"kind": "helios", "input": {"text": f"locust {self.name_}", "latency_s": 0.05, "max_experts": 2}}
        r = self.client.post("/v1/jobs", json=job, headers=h, name="submit")
        if r.status_code == 202:
            self.client.get(f"/v1/jobs/{r.json()['job_id']}", headers=h, name="status")
        raise StopUser
