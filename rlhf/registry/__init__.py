"""The model registry shared by all stages.

It answers: what is this adapter, what base does it sit on, which data, config and code
produced it, and what came from it. A registry is a database (by default the SQLite file
``<home>/registry/registry.db``; or a PostgreSQL database named by
``$RLHF_REGISTRY_URL=postgresql://...``) plus an artifact store directory (by default
``<home>/registry/artifacts``; ``$RLHF_REGISTRY_STORE``).

Example::

    from rlhf.registry import Registry

    reg = Registry.open()
    base = reg.register_base("tiny", "/models/tiny")
    run = reg.start_run("sft", config, inputs=[base.ref, "prefs:latest"])
    sft = reg.register_adapter("tiny-sft", "sft", out_dir / "adapter", base=base.ref, run=run)
    reg.finish_run(run, "completed", {"loss": 1.2}, outputs=[sft.ref])
"""

from rlhf.registry.db import DatabaseError
from rlhf.registry.entry import (
    KINDS,
    ROLES,
    RUN_STATUSES,
    DependencyError,
    Entry,
    IntegrityError,
    NotFoundError,
    Problem,
    RegistryError,
    parse_ref,
    validate_alias,
    validate_name,
)
from rlhf.registry.registry import GcResult, Registry

__all__ = [
    "KINDS",
    "ROLES",
    "RUN_STATUSES",
    "DatabaseError",
    "DependencyError",
    "Entry",
    "GcResult",
    "IntegrityError",
    "NotFoundError",
    "Problem",
    "Registry",
    "RegistryError",
    "parse_ref",
    "validate_alias",
    "validate_name",
]
