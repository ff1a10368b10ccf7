"""``rlhf registry ...``: inspect and manage the model registry from the shell.

Usage (also ``python -m rlhf.registry ...``)::

    rlhf registry list [--kind base|adapter|dataset|run] [--json]
    rlhf registry show REF [--json]
    rlhf registry lineage REF [--json]
    rlhf registry tag REF ALIAS
    rlhf registry untag NAME:ALIAS
    rlhf registry verify [REF] [--json]
    rlhf registry export REF OUT_DIR [--dtype auto|float32|bfloat16|float16]
    rlhf registry rm REF [--force]
    rlhf registry gc [--yes]
    rlhf registry rebuild
    rlhf registry migrate --to URL

Every command takes ``--home DIR`` (default ``$RLHF_HOME``, then ``~/.rlhf``), ``--url URL``
(the database: a path, ``sqlite:///path.db`` or ``postgresql://user@host:port/db``;
default ``$RLHF_REGISTRY_URL``, then ``<home>/registry/registry.db``) and ``--store DIR``
(the artifact store; default ``$RLHF_REGISTRY_STORE``, then ``<home>/registry/artifacts``).
Exit status: 0 on success, 1 on an error or a failed verification, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys

from rlhf.registry.entry import KINDS, Entry, RegistryError, parse_ref
from rlhf.registry.registry import Registry


def _common() -> argparse.ArgumentParser:
    # SUPPRESS defaults let --home/--url appear before or after the subcommand without the
    # subparser's default overwriting a value given before it.
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--home", default=argparse.SUPPRESS, help="rlhf home directory (default: $RLHF_HOME, then ~/.rlhf)")
    p.add_argument("--url", default=argparse.SUPPRESS,
                   help="registry database: a path, sqlite:///path.db or postgresql://user@host:port/db "
                        "(default: $RLHF_REGISTRY_URL, then <home>/registry/registry.db)")
    p.add_argument("--store", default=argparse.SUPPRESS,
                   help="artifact store directory (default: $RLHF_REGISTRY_STORE, then <home>/registry/artifacts)")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="rlhf registry", parents=[common],
        description="The model registry: base models, LoRA adapters, dataset versions, stage runs and their lineage.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", parents=[common], help="list entries")
    p.add_argument("--kind", choices=KINDS, help="only entries of this kind")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("show", parents=[common], help="show one entry")
    p.add_argument("ref", help="name, name:VERSION, name:latest or name:ALIAS")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("lineage", parents=[common], help="what an entry came from and what came from it")
    p.add_argument("ref")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("tag", parents=[common], help="point name:ALIAS at the version REF names")
    p.add_argument("ref")
    p.add_argument("alias")

    p = sub.add_parser("untag", parents=[common], help="remove an alias")
    p.add_argument("ref", help="name:ALIAS")

    p = sub.add_parser("verify", parents=[common], help="re-hash files and report mismatches and missing files")
    p.add_argument("ref", nargs="?", help="one entry (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("export", parents=[common], help="merge an adapter into its base as a standalone HF model")
    p.add_argument("ref")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype to load and save the merged model in (default: the base's)")

    p = sub.add_parser("rm", parents=[common], help="remove one version (refuses while others depend on it)")
    p.add_argument("ref")
    p.add_argument("--force", action="store_true", help="remove even if other entries depend on it")

    p = sub.add_parser("gc", parents=[common],
                       help="list (with --yes: delete) leftovers of crashed registrations and removed versions")
    p.add_argument("--yes", action="store_true", help="delete them (without it, gc only reports)")

    sub.add_parser("rebuild", parents=[common],
                   help="re-create a lost, empty or damaged database from the artifact store's records")

    p = sub.add_parser("migrate", parents=[common],
                       help="copy the registry into another (empty) database, e.g. SQLite -> PostgreSQL, and verify")
    p.add_argument("--to", required=True, metavar="URL", help="target database: a path, sqlite:///... or postgresql://...")
    return parser


def _summary(e: Entry) -> str:
    m = e.metadata
    if e.kind == "adapter":
        detail = f"role={e.role} base={m.get('base')}"
    elif e.kind == "base":
        if m.get("source") == "hub":
            detail = f"hub={m.get('hub_id')}@{m.get('revision') or 'unpinned'}"
        else:
            detail = f"local={m.get('local_path')} hash={str(m.get('content_hash'))[:12]}"
    elif e.kind == "dataset":
        detail = f"hash={str(m.get('content_hash'))[:12]} counts={json.dumps(m.get('manifest', {}).get('counts'))}"
    else:
        detail = f"stage={m.get('stage')} status={m.get('status')}"
        if m.get("reason"):
            detail += f" ({m['reason']})"
    aliases = f" [{', '.join(e.aliases)}]" if e.aliases else ""
    return f"{e.ref:<32} {e.kind:<8} {detail}{aliases}"


def _scalars(d: dict) -> str:
    """``key=value`` for the numbers and short strings of ``d``, in key order."""
    out = []
    flat = {}
    for k, v in d.items():  # one level of nesting ({"eval": {"gold_mean": ...}}) becomes eval.gold_mean
        flat.update({f"{k}.{kk}": vv for kk, vv in v.items()} if isinstance(v, dict) else {k: v})
    for k, v in sorted(flat.items()):
        if isinstance(v, float):
            out.append(f"{k}={v:.4g}")
        elif isinstance(v, (int, str)) and not isinstance(v, bool) and len(str(v)) <= 40:
            out.append(f"{k}={v}")
    return " ".join(out)


def _show_lines(reg: Registry, e: Entry) -> list[str]:
    """A one-screen view of an entry: what it is, where it came from, how it scored.

    The full record (the PEFT config, every file hash, the run's config) is ``--json``.
    """
    m = e.metadata
    what = e.kind + (f", role {e.role}" if e.role else "")
    lines = [f"{e.ref}  ({what}){'  [' + ', '.join(e.aliases) + ']' if e.aliases else ''}",
             f"  created  {e.created}"]
    if e.path is not None:
        lines.append(f"  path     {e.path}")
    for relation in ("base", "parent", "input", "run"):
        refs = [ref for ref, rels in e.relations.items() if relation in rels]
        if refs:
            lines.append(f"  {relation:<8} {', '.join(refs)}")
    run = None
    if e.kind == "adapter":
        peft = m.get("peft_config") or {}
        targets = peft.get("target_modules")
        targets = ",".join(sorted(targets)) if isinstance(targets, list) else targets
        lines.append(f"  lora     r={peft.get('r')} alpha={peft.get('lora_alpha')} targets={targets}"
                     + ("  + score head" if m.get("head") else ""))
        run_refs = [ref for ref, rels in e.relations.items() if "run" in rels]
        run = reg.resolve(run_refs[0]) if run_refs else None
    elif e.kind == "base":
        source = (f"hub {m.get('hub_id')}@{m.get('revision') or 'unpinned'}" if m.get("source") == "hub"
                  else f"local {m.get('local_path')}")
        lines.append(f"  source   {source}  hash {str(m.get('content_hash'))[:12]}")
    elif e.kind == "dataset":
        counts = (m.get("manifest") or {}).get("counts")
        lines.append(f"  data     hash {str(m.get('content_hash'))[:12]}  counts {json.dumps(counts)}")
    elif e.kind == "run":
        run = e
    if run is not None:
        rm = run.metadata
        status = f"{rm.get('status')}" + (f" ({rm['reason']})" if rm.get("reason") else "")
        lines.append(f"  stage    {rm.get('stage')} ({run.ref}): {status}, started {rm.get('started')}"
                     + (f", ended {rm['ended']}" if rm.get("ended") else ""))
        metrics = _scalars(rm.get("metrics") or {})
        lines.append(f"  metrics  {metrics or '(none recorded)'}")
    size = sum(f.stat().st_size for f in (e.path.rglob("*") if e.path is not None and e.path.is_dir() else [])
               if f.is_file())
    lines.append(f"  files    {len(e.files)}" + (f" ({size / 1e6:.1f} MB)" if size else "")
                 + "; `rlhf registry show --json` prints the full record")
    return lines


def _print_tree(nodes: list[dict], key: str, indent: str) -> None:
    for i, n in enumerate(nodes):
        last = i == len(nodes) - 1
        extra = " ".join(f"{k}={n[k]}" for k in ("role", "stage", "status", "source", "revision", "content_hash")
                         if n.get(k) is not None)
        print(f"{indent}{'`-- ' if last else '|-- '}{n['relation']}: {n['ref']} ({n['kind']}{', ' + extra if extra else ''})")
        _print_tree(n.get(key, []), key, indent + ("    " if last else "|   "))


def _run(args: argparse.Namespace) -> int:
    where = dict(home=getattr(args, "home", None), url=getattr(args, "url", None), store_dir=getattr(args, "store", None))
    if args.command == "rebuild":
        with Registry.rebuild(**where) as reg:
            n = len(reg.list())
            problems = reg.verify()
            for p in problems:
                print(p)
            print(f"rebuilt {reg.db.where} from {reg.artifacts}: {n} entr{'y' if n == 1 else 'ies'}, "
                  f"{len(problems)} problem{'s' if len(problems) != 1 else ''}")
            return 1 if problems else 0
    with Registry.open(**where) as reg:
        cmd = args.command
        if cmd == "list":
            entries = reg.list(args.kind)
            if args.json:
                print(json.dumps([e.to_dict() for e in entries], indent=2, default=str))
            elif not entries:
                print("(registry is empty)" if args.kind is None else f"(no {args.kind} entries)")
            else:
                for e in entries:
                    print(_summary(e))
        elif cmd == "show":
            e = reg.resolve(args.ref)
            if args.json:
                print(json.dumps(e.to_dict(), indent=2, default=str))
            else:
                for line in _show_lines(reg, e):
                    print(line)
        elif cmd == "lineage":
            tree = reg.lineage(args.ref)
            if args.json:
                print(json.dumps(tree, indent=2, default=str))
            else:
                print(f"{tree['ref']} ({tree['kind']}{', role=' + tree['role'] if tree.get('role') else ''})")
                print("came from:" if tree["ancestors"] else "came from: (nothing recorded)")
                _print_tree(tree["ancestors"], "ancestors", "  ")
                print("derived:" if tree["descendants"] else "derived: (nothing yet)")
                _print_tree(tree["descendants"], "descendants", "  ")
        elif cmd == "tag":
            e = reg.tag(args.ref, args.alias)
            print(f"{e.name}:{args.alias} -> {e.ref}")
        elif cmd == "untag":
            name, alias = parse_ref(args.ref)
            if not isinstance(alias, str):
                raise ValueError(f"untag: expected NAME:ALIAS, got {args.ref!r}")
            reg.untag(name, alias)
            print(f"removed alias {name}:{alias}")
        elif cmd == "verify":
            problems = reg.verify(args.ref)
            checked = 1 if args.ref else len(reg.list())
            if args.json:
                print(json.dumps({"ok": not problems, "checked": checked,
                                  "problems": [p.to_dict() for p in problems]}, indent=2))
            else:
                for p in problems:
                    print(p)
                print(f"{'OK' if not problems else 'FAILED'}: {checked} entr{'y' if checked == 1 else 'ies'} checked, "
                      f"{len(problems)} problem{'s' if len(problems) != 1 else ''}")
            return 1 if problems else 0
        elif cmd == "export":
            out = reg.export(args.ref, args.out_dir, dtype=args.dtype)
            print(f"exported {reg.resolve(args.ref).ref} to {out}")
        elif cmd == "rm":
            e = reg.remove(args.ref, force=args.force)
            print(f"removed {e.ref}")
        elif cmd == "gc":
            result = reg.gc(dry_run=not args.yes)
            for path, why in result.remove:
                print(f"{'removed' if result.deleted else 'would remove'} {path} ({why})")
            for path, why in result.keep:
                print(f"kept {path} ({why})")
            n = len(result.remove)
            print(f"{n} unreferenced item{'' if n == 1 else 's'} {'removed' if result.deleted else 'found'}"
                  + ("" if result.deleted or not n else "; run again with --yes to delete them"))
        elif cmd == "migrate":
            with reg.migrate(args.to) as target:
                n = len(target.list())
                print(f"migrated {n} entr{'y' if n == 1 else 'ies'} from {reg.db.where} to {target.db.where} and "
                      f"verified the copy; the artifact store stays {reg.artifacts}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``rlhf registry`` with ``argv`` (the arguments after ``registry``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help and on usage errors
        return int(e.code or 0)
    try:
        return _run(args)
    except (RegistryError, ValueError, RuntimeError) as e:
        print(f"rlhf registry {args.command}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        raise  # `rlhf registry list | head`: rlhf's entry point ends quietly with 141
    except OSError as e:  # a full disk, a permission, a missing file: name the path, no traceback
        what = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
        print(f"rlhf registry {args.command}: error: {what}", file=sys.stderr)
        return 1
