"""The model registry shared by all stages.

It answers: what is this adapter, what base does it sit on, which data, config and code
produced it, and what came from it. One registry lives under ``<home>/registry``
(``registry.db``, a SQLite database in WAL mode, and ``artifacts/``).

Example::

    from rlhf.registry import Registry

    reg = Registry.open()
    base = reg.register_base("tiny", "/models/tiny")
    run = reg.start_run("sft", config, inputs=[base.ref, "prefs:latest"])
    sft = reg.register_adapter("tiny-sft", "sft", out_dir / "adapter", base=base.ref, run=run)
    reg.finish_run(run, "completed", {"loss": 1.2}, outputs=[sft.ref])
"""

from rlhf.registry.registry import (
    KINDS,
    ROLES,
    DependencyError,
    Entry,
    NotFoundError,
    Problem,
    Registry,
    RegistryError,
    parse_ref,
    validate_alias,
    validate_name,
)

__all__ = [
    "KINDS",
    "ROLES",
    "DependencyError",
    "Entry",
    "NotFoundError",
    "Problem",
    "Registry",
    "RegistryError",
    "parse_ref",
    "validate_alias",
    "validate_name",
]
