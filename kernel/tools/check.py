"""``aiwfe check``: validate manifests as a whole, every problem at once with a hint.

Per manifest: misspelled keys anywhere (manifest sections, system and pod settings, plugin
config, handler overrides; each with a "did you mean"), unknown plugins, invalid plugin
classes (each bad handler named with the signature it should have), config that does not
fit a plugin's ``Config`` or its own :meth:`~aiwfe.kernel.plugin.Plugin.validate_config`,
config values naming contracts no pod serves (:attr:`~aiwfe.kernel.plugin.Plugin.config_addresses`,
e.g. the gateway's ``job_kinds``), empty pods, a subject served twice in one pod, handler
overrides for contracts the pod does not serve, contracts called but served by no pod,
``[system.jobs."<address>"]`` for a job no pod serves or caps naming no field of its contract,
pods' CPU requests and limits that are not CPU quantities or whose request exceeds the limit.
A pod checks its own plugins again, with the same messages, when it starts.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable
from pathlib import Path

import msgspec

from .._config_keys import did_you_mean, strip_unknown, unknown_keys
from ..config_check import config_problems, handler_options, served_contracts
from ..contract import address_of, kind_of
from ..errors import ConfigError
from ..manifest import Manifest, interpolate
from ..plugin import Plugin, config_type, handlers_of, validate_plugin_class
from ..quotas import caps_of
from ..registry import discover, resolve
from .cpu_share import resource_problems

__all__ = ["Problem", "check_manifests", "load_for_check"]


class Problem(msgspec.Struct, frozen=True):
    """One validation finding: where, what, and how to fix it."""

    where: str
    what: str
    hint: str = ""

    def __str__(self) -> str:
        return f"{self.where}: {self.what}" + (f"\n    hint: {self.hint}" if self.hint else "")


def load_for_check(path: str | os.PathLike[str]) -> tuple[Manifest | None, list[Problem]]:
    """Read a manifest, reporting every misspelled key (with the closest known one) instead
    of stopping at the first; the rest is converted without them so it can still be checked.

    Returns the manifest (None when it cannot be read or converted) and the problems found.
    """
    src = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        return None, [Problem(src, f"cannot read manifest: {e.strerror}", "check the path")]
    try:
        raw = interpolate(tomllib.loads(text), os.environ)
    except tomllib.TOMLDecodeError as e:
        return None, [Problem(src, f"invalid TOML: {e}", "fix the TOML syntax")]
    except ConfigError as e:
        return None, [Problem(src, e.message, "set the variable or give it a default")]
    problems = [
        Problem(f"{src}: [{u.path}]" if u.path else src, f"unknown key {u.key!r}", u.hint()) for u in unknown_keys(raw, Manifest)
    ]
    raw = strip_unknown(raw, Manifest)
    raw["source"] = src
    try:
        return msgspec.convert(raw, Manifest, strict=False), problems
    except msgspec.ValidationError as e:
        return None, [*problems, Problem(src, str(e), "fix the manifest file")]


def _resolve_plugins(m: Manifest, src: str, installed: dict[str, str], problems: list[Problem]) -> dict[str, type[Plugin]]:
    classes: dict[str, type[Plugin]] = {}
    for pod_name, pod in m.pods.items():
        if not pod.plugins:
            problems.append(Problem(f"{src}: pod {pod_name}", "has no plugins", "list at least one plugin"))
        if pod.replicas < 1:
            problems.append(Problem(f"{src}: pod {pod_name}", f"replicas = {pod.replicas}", "use 1 or more"))
        for pname in pod.plugins:
            if pname in classes:
                continue
            try:
                cls = resolve(pname, installed)
            except LookupError as e:
                hint = did_you_mean(pname, installed, what="installed") if ":" not in pname else ""
                problems.append(Problem(f"{src}: pod {pod_name}", str(e), hint or "check the spelling in `plugins = [...]`"))
                continue
            except Exception as e:
                problems.append(Problem(f"{src}: plugin {pname}", f"failed to import: {e!r}"))
                continue
            for p in validate_plugin_class(cls):
                problems.append(Problem(f"{src}: plugin {pname}", p))
            classes[pname] = cls
    return classes


def _check_config(
    m: Manifest, src: str, classes: dict[str, type[Plugin]], served: dict[str, str], problems: list[Problem]
) -> None:
    for pname in m.plugins:
        if pname not in classes:
            run = [p for pod in m.pods.values() for p in pod.plugins]
            problems.append(
                Problem(
                    f"{src}: [plugins.{pname}]",
                    "configures a plugin no pod runs",
                    did_you_mean(pname, run, what="plugins the pods run") + " (or remove the table, or add the plugin to a pod)",
                )
            )
    for pname, cls in classes.items():
        if pname not in m.plugins:
            try:
                msgspec.convert({}, config_type(cls))
            except msgspec.ValidationError as e:
                problems.append(Problem(f"{src}: plugin {pname}", f"config required: {e}", f"add a [plugins.{pname}] table"))
                continue
        _config, found = config_problems(cls, m.plugins.get(pname, {}), served)
        problems.extend(Problem(f"{src}: [plugins.{pname}]", what, hint) for what, hint in found)


def _check_pods(m: Manifest, src: str, classes: dict[str, type[Plugin]], problems: list[Problem]) -> None:
    for pod_name, pod in m.pods.items():
        addresses = {s.address: s for p in pod.plugins if p in classes for s in handlers_of(classes[p])}
        for address, override in pod.handlers.items():
            where = f"{src}: [pods.{pod_name}.handlers.{address!r}]"
            if address not in addresses:
                problems.append(
                    Problem(where, "no plugin in this pod serves it", did_you_mean(address, addresses, what="served here"))
                )
                continue
            _opts, found = handler_options(addresses[address].options, override)
            problems.extend(Problem(where, what, hint) for what, hint in found)
        in_pod: dict[str, str] = {}
        for pname in pod.plugins:
            pcls = classes.get(pname)
            if pcls is None:
                continue
            for spec in handlers_of(pcls):
                if spec.address == "?":
                    continue
                if spec.address in in_pod and spec.kind != "event":
                    problems.append(
                        Problem(
                            f"{src}: pod {pod_name}",
                            f"{spec.address} is served twice: by {in_pod[spec.address]} and by {pname}",
                            "keep one of the two plugins in this pod",
                        )
                    )
                in_pod[spec.address] = pname


def _check_calls(src: str, classes: dict[str, type[Plugin]], served: dict[str, str], problems: list[Problem]) -> None:
    for pname, cls in classes.items():
        for c in cls.calls:
            try:
                addr = address_of(c)
                kind = kind_of(c)
            except TypeError:
                continue
            if kind != "event" and addr not in served:
                problems.append(
                    Problem(
                        f"{src}: plugin {pname}",
                        f"calls {addr} ({c.__qualname__}) but no pod serves it",
                        f"add the plugin serving {addr} to a pod",
                    )
                )


def _check_job_limits(m: Manifest, src: str, classes: dict[str, type[Plugin]], problems: list[Problem]) -> None:
    jobs = {s.address: s.contract for cls in classes.values() for s in handlers_of(cls) if s.kind == "job"}
    for address, limits in m.system.jobs.items():
        where = f'{src}: [system.jobs."{address}"]'
        contract = jobs.get(address)
        if contract is None:
            problems.append(Problem(where, "no pod serves this job", did_you_mean(address, jobs, what="jobs served")))
            continue
        try:
            caps_of(contract, limits)
        except ConfigError as e:
            problems.append(Problem(where, e.message, "name fields of the job's contract in caps"))


def check_manifests(manifests: Iterable[Manifest]) -> list[Problem]:
    """Validate manifests; return every problem at once (empty list = valid).

    See the module docstring for what is checked. Misspelled keys of the manifest itself
    are found by :func:`load_for_check` (a parsed :class:`Manifest` has none left).
    """
    problems: list[Problem] = []
    installed = discover()
    for m in manifests:
        src = m.source or "manifest"
        classes = _resolve_plugins(m, src, installed, problems)
        served = served_contracts(classes.values())
        _check_config(m, src, classes, served, problems)
        _check_pods(m, src, classes, problems)
        _check_calls(src, classes, served, problems)
        _check_job_limits(m, src, classes, problems)
        problems.extend(Problem(f"{src}: {where}", what, hint) for where, what, hint in resource_problems(m))
    return problems
