"""A request's adapter, resolved once at admission: the Sequence holds this handle, not an id to look up.

It names the registry entry (the loaded instance, its kind, where it is resident) and keeps what the
request holds of it: the reference taken at admission (released when the request ends) and the pin
while it runs. The entry's instance cannot change while the handle holds its reference (the host tier
never drops an adapter a request holds), so the KV the request computes is that instance's alone.
"""
from __future__ import annotations

from dataclasses import dataclass


def instance_salt(instance: int) -> bytes:
    """What every cache salt of this loaded instance starts with (block_manager.forget_salt drops them all)."""
    return f"a{instance}/".encode()


@dataclass(eq=False)
class AdapterHandle:
    entry: object  # manager.AdapterEntry
    task: int = 0  # multitask prompt tuning: which task's prompt
    pinned: bool = False  # pinned in the device pool while its sequence runs
    released: bool = False

    @property
    def adapter_id(self) -> str:
        return self.entry.adapter_id

    @property
    def kind(self):
        """The adapter's kind type (server/adapters/kinds.py)."""
        return self.entry.family

    @property
    def host(self):
        """The loaded serving form (PromptAdapter, Ia3Adapter, ...; LoRA: packed pages)."""
        return self.entry.host

    @property
    def num_virtual_tokens(self) -> int:
        return self.kind.num_virtual_tokens(self.entry.host)

    @property
    def cache_salt(self) -> bytes:
        """Part of every KV block hash of its sequence: this loaded instance and task, nothing else."""
        return instance_salt(self.entry.instance) + f"t{self.task}".encode()
