"""``aiwfe check``: validate manifests as a whole, every problem at once with a hint.

Per manifest: unknown plugins, invalid plugin classes (each bad handler named with the
signature it should have), config that does not fit a plugin's ``Config``, empty pods, a
subject served twice in one pod, handler overrides for contracts the pod does not serve,
contracts called but served by no pod. A pod checks its own plugins again when it starts.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from ..contract import address_of, kind_of
from ..manifest import Manifest
from ..plugin import HandlerOptions, Plugin, config_type, handlers_of, validate_plugin_class
from ..registry import discover, resolve

__all__ = ["Problem", "check_manifests"]


class Problem(msgspec.Struct, frozen=True):
    """One validation finding: where, what, and how to fix it."""

    where: str
    what: str
    hint: str = ""

    def __str__(self) -> str:
        return f"{self.where}: {self.what}" + (f"\n    hint: {self.hint}" if self.hint else "")


def check_manifests(manifests: Iterable[Manifest]) -> list[Problem]:
    """Validate manifests; return every problem at once (empty list = valid).

    Checks: unknown or unimportable plugins, invalid plugin classes, config that does not
    fit the plugin's Config, empty pods, a subject served twice in one pod, and contracts
    called (or jobs consumed) that no pod of the manifest serves.
    """
    problems: list[Problem] = []
    installed = discover()
    for m in manifests:
        src = m.source or "manifest"
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
                    problems.append(Problem(f"{src}: pod {pod_name}", str(e), "check the spelling in `plugins = [...]`"))
                    continue
                except Exception as e:
                    problems.append(Problem(f"{src}: plugin {pname}", f"failed to import: {e!r}"))
                    continue
                for p in validate_plugin_class(cls):
                    problems.append(Problem(f"{src}: plugin {pname}", p))
                classes[pname] = cls
        for pname, raw in m.plugins.items():
            if pname not in classes:
                problems.append(
                    Problem(
                        f"{src}: [plugins.{pname}]",
                        "configures a plugin no pod runs",
                        "remove the table or add the plugin to a pod",
                    )
                )
                continue
            try:
                msgspec.convert(raw, config_type(classes[pname]), strict=False)
            except msgspec.ValidationError as e:
                fields = ", ".join(getattr(config_type(classes[pname]), "__struct_fields__", ()))
                problems.append(Problem(f"{src}: [plugins.{pname}]", str(e), f"{pname}.Config fields: {fields or 'none'}"))
        for pname, cls in classes.items():
            if pname not in m.plugins:
                try:
                    msgspec.convert({}, config_type(cls))
                except msgspec.ValidationError as e:
                    problems.append(Problem(f"{src}: plugin {pname}", f"config required: {e}", f"add a [plugins.{pname}] table"))
        for pod_name, pod in m.pods.items():
            addresses = {s.address: s for p in pod.plugins if p in classes for s in handlers_of(classes[p])}
            for address, override in pod.handlers.items():
                where = f"{src}: [pods.{pod_name}.handlers.{address!r}]"
                if address not in addresses:
                    problems.append(
                        Problem(
                            where, "no plugin in this pod serves it", f"served here: {', '.join(sorted(addresses)) or 'none'}"
                        )
                    )
                    continue
                try:
                    msgspec.convert(
                        {**msgspec.structs.asdict(addresses[address].options), **override}, HandlerOptions, strict=False
                    )
                except (msgspec.ValidationError, TypeError) as e:
                    fields = ", ".join(HandlerOptions.__struct_fields__)
                    problems.append(Problem(where, str(e), f"fields: {fields}"))
        served: dict[str, str] = {}
        for pod_name, pod in m.pods.items():
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
                    served.setdefault(spec.address, pod_name)
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
    return problems
