"""``rlhf data`` subcommands: ingest, list, show, quarantine.

Usage::

    rlhf data ingest SOURCE... --name NAME [--format F] [--map key=column ...] [--test-fraction 0.05]
                     [--ties drop|keep] [--label-field COL] [--binarize MODE] [--min-margin X]
                     [--score-field KEY] [--seed N] [--max-row-bytes N] [--json-fields COL,...]
                     [--strict-empty] [--allow-partial] [--score EXPR] [--label-names NAMES] [--group-by COL]
                     [--group-mode consecutive|global] [--transcript-template T]
                     [--hf-config NAME] [--hf-data-dir DIR] [--hf-split SPLIT]
                     [--lower-is-better | --higher-is-better] [--ignore-label-column]
    rlhf data list [--json]
    rlhf data show NAME[:VERSION] [--json] [--tokenizer PATH]
    rlhf data quarantine NAME[:VERSION] [--reason R] [--limit N] [--json]

Every subcommand takes ``--home DIR`` (default: ``$RLHF_HOME`` or ``~/.rlhf``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from reward_data import ingestion
from reward_data import store
from reward_data.options import BINARIZE, GROUP_MODES, TIES, IngestOptions
from reward_data.readers import READERS
from reward_data.schema import REASONS
from reward_data.stats import shortcut_warnings, token_stats


def _parse_map(items: list[str]) -> dict[str, str]:
    mapping = {}
    for item in items:
        key, sep, column = item.partition("=")
        if not sep or not key or not column:
            raise ValueError(f"--map {item!r}: expected key=column")
        mapping[key.strip()] = column.strip()
    return mapping


def _parse_split(text: str) -> float:
    """The deprecated ``--split test=F`` (or ``--split F``) as a fraction."""
    key, sep, value = text.partition("=")
    if not sep:
        key, value = "test", text
    if key != "test":
        raise ValueError(f"--split {text!r}: expected test=FRACTION")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"--split {text!r}: {value!r} is not a number") from None


def _help(name: str) -> str:
    return next(f.metadata["help"] for f in fields(IngestOptions) if f.name == name)


def formats_epilog() -> str:
    """Every format with one example row (``rlhf data ingest --help``)."""
    lines = ["formats (detected per file when the columns are unambiguous; --format names one):"]
    for name, reader in READERS.items():
        doc = (reader.__doc__ or "").strip().splitlines()[0].replace("``", "")
        lines.append(f"  {name}: {doc}")
        lines.append(f"      {json.dumps(reader.EXAMPLE, ensure_ascii=False)}")
        if getattr(reader, "EXAMPLE_FLAGS", None):
            lines.append(f"      with {reader.EXAMPLE_FLAGS}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    home = argparse.ArgumentParser(add_help=False)
    home.add_argument("--home", default=argparse.SUPPRESS, help="rlhf home (default: $RLHF_HOME or ~/.rlhf)")
    parser = argparse.ArgumentParser(prog="rlhf data", description="Preference-data ingestion and inspection.",
                                     parents=[home])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", parents=[home], help="ingest sources into a new dataset version",
                       epilog=formats_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="file, directory, save_to_disk path or hub id")
    p.add_argument("--name", required=True, help="dataset name")
    p.add_argument("--format", choices=list(READERS), help="reader to use (detected per file when unambiguous)")
    p.add_argument("--map", action="append", default=[], metavar="KEY=COLUMN",
                   help="map prompt/chosen/rejected/margin/system to a source column (dotted path ok); implies "
                        "generic (with --format scored: prompt/response/transcript/system)")
    p.add_argument("--test-fraction", type=float, default=None, metavar="F",
                   help="share of prompts held out as the test split, chosen by prompt hash (default 0.05)")
    # `--split` names a split to read everywhere else (`rlhf eval --split test`, --hf-split).
    p.add_argument("--split", help=argparse.SUPPRESS)
    p.add_argument("--ties", choices=TIES, default="drop", help=_help("ties"))
    p.add_argument("--label-field", help=_help("label_field"))
    p.add_argument("--binarize", choices=BINARIZE, default="best_worst", help=_help("binarize"))
    p.add_argument("--min-margin", type=float, default=0.0, help=_help("min_margin"))
    p.add_argument("--score-field", help=_help("score_field"))
    p.add_argument("--seed", type=int, default=0, help=_help("seed"))
    p.add_argument("--max-row-bytes", type=int, default=IngestOptions.max_row_bytes, help=_help("max_row_bytes"))
    p.add_argument("--hf-split", help=_help("hf_split"))
    p.add_argument("--hf-config", help=_help("hf_config"))
    p.add_argument("--hf-data-dir", help=_help("hf_data_dir"))
    p.add_argument("--json-fields", metavar="COL,...", help=_help("json_fields"))
    p.add_argument("--strict-empty", action="store_true", help=_help("strict_empty"))
    p.add_argument("--allow-partial", action="store_true", help=_help("allow_partial"))
    p.add_argument("--score", help=_help("score"))
    p.add_argument("--label-names", metavar="[COL=]NAME,...|steerlm", help=_help("label_names"))
    p.add_argument("--group-by", metavar="COL", help=_help("group_by"))
    p.add_argument("--group-mode", choices=GROUP_MODES, default="consecutive", help=_help("group_mode"))
    p.add_argument("--transcript-template", metavar="PRESET|JSON|role=M;...", help=_help("transcript_template"))
    order = p.add_mutually_exclusive_group()
    order.add_argument("--lower-is-better", dest="lower_is_better", action="store_true", default=None,
                       help=_help("lower_is_better"))
    order.add_argument("--higher-is-better", dest="lower_is_better", action="store_false",
                       help="Rated and ranked data: a larger score is better (overrides the rank-name default).")
    p.add_argument("--ignore-label-column", action="store_true", help=_help("ignore_label_column"))

    p = sub.add_parser("list", parents=[home], help="list datasets and versions")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("show", parents=[home], help="counts, reconciliation and statistics of a version")
    p.add_argument("ref", metavar="NAME[:VERSION]")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--tokenizer", help="local tokenizer directory for token-length percentiles")

    p = sub.add_parser("quarantine", parents=[home], help="print the rejected rows with reasons and positions")
    p.add_argument("ref", metavar="NAME[:VERSION]")
    p.add_argument("--reason", choices=sorted(REASONS), help="only this reason")
    p.add_argument("--limit", type=int, default=None, help="print at most N entries")
    p.add_argument("--json", action="store_true", help="print the JSON lines as stored")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``rlhf data ARGV``; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    home = getattr(args, "home", None)
    try:
        if args.command == "ingest":
            return _ingest(args, home)
        if args.command == "list":
            return _list(args, home)
        if args.command == "show":
            return _show(args, home)
        return _quarantine(args, home)
    except BrokenPipeError:
        raise  # `rlhf data show X | head`: the caller's entry point ends quietly
    except (ValueError, KeyError, FileNotFoundError, OSError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"rlhf data {args.command}: error: {msg}", file=sys.stderr)
        return 1


def _test_fraction(args) -> float:
    if args.split is None:
        return 0.05 if args.test_fraction is None else args.test_fraction
    if args.test_fraction is not None:
        raise ValueError("give --test-fraction only (--split test=F is its deprecated spelling)")
    fraction = _parse_split(args.split)
    message = f"--split {args.split} is deprecated; use --test-fraction {fraction:g}"
    print(f"rlhf data ingest: warning: {message}", file=sys.stderr)
    return fraction


def _ingest(args, home) -> int:
    info = ingestion.ingest(
        args.sources,
        args.name,
        format=args.format,
        mapping=_parse_map(args.map),
        test_fraction=_test_fraction(args),
        home=home,
        ties=args.ties,
        label_field=args.label_field,
        binarize=args.binarize,
        min_margin=args.min_margin,
        score_field=args.score_field,
        seed=args.seed,
        max_row_bytes=args.max_row_bytes,
        hf_split=args.hf_split,
        hf_config=args.hf_config,
        hf_data_dir=args.hf_data_dir,
        json_fields=args.json_fields,
        strict_empty=args.strict_empty,
        allow_partial=args.allow_partial,
        score=args.score,
        label_names=args.label_names,
        group_by=args.group_by,
        group_mode=args.group_mode,
        transcript_template=args.transcript_template,
        lower_is_better=args.lower_is_better,
        ignore_label_column=args.ignore_label_column,
    )
    m = info.manifest
    c = m["counts"]
    if info.reused:
        print(f"{info.ref}: identical content to the latest version (content_hash {info.content_hash[:12]}); "
              f"reusing it, no new version written -> {info.path}")
        return 0
    print(f"{info.ref}: {c['accepted']} accepted (train {c['train']}, test {c['test']}), "
          f"{c['duplicates']} duplicates, {c['quarantined']} quarantined from {c['rows_in']} rows -> {info.path}")
    print(f"content_hash {info.content_hash}")
    for line in _warnings(m):
        print(f"warning: {line}", file=sys.stderr)
    return 0


def _warnings(m: dict) -> list[str]:
    """Damage and shortcut warnings for a manifest (also printed by ``show``)."""
    out = []
    damaged = {r: n for r, n in m["quarantine_reasons"].items() if r in ("truncated", "short_row", "malformed_csv")}
    if damaged:
        out.append("damaged input: " + ", ".join(f"{r} {n}" for r, n in damaged.items())
                   + f" (see: rlhf data quarantine {m['name']}:{m['version']} --reason truncated)")
    out += [f"possible shortcut: {w}" for w in shortcut_warnings(m["stats"], m["counts"]["accepted"])]
    return out


def _list(args, home) -> int:
    root = store.data_root(home)
    for d in (root, *root.parents):
        if d.exists() and not d.is_dir():  # e.g. $RLHF_HOME names a file: not "no datasets"
            raise ValueError(f"{d}: not a directory, so {root} cannot hold datasets (check --home / $RLHF_HOME)")
    rows = []
    for name in store.list_names(home):
        for v in store.versions(name, home):
            m = store.read_manifest(store.data_root(home) / name / str(v))
            rows.append({"name": name, "version": v, "created": m["created"], "format": m["format"],
                         "accepted": m["counts"]["accepted"], "content_hash": m["content_hash"]})
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no datasets in {store.data_root(home)}")
    else:
        print(f"{'NAME:VERSION':<32} {'CREATED':<21} {'FORMAT':<13} {'ACCEPTED':>9}  HASH")
        for r in rows:
            print(f"{r['name'] + ':' + str(r['version']):<32} {r['created']:<21} {str(r['format']):<13} "
                  f"{r['accepted']:>9}  {r['content_hash'][:12]}")
    return 0


def reconciliation(counts: dict) -> list[tuple[str, bool]]:
    """The three accounting identities as printable lines, each with whether it holds."""
    c = counts
    return [
        (f"rows_in {c['rows_in']} = rows_quarantined {c['rows_quarantined']} + rows_with_pairs {c['rows_with_pairs']}",
         c["rows_in"] == c["rows_quarantined"] + c["rows_with_pairs"]),
        (f"pairs {c['pairs']} = accepted {c['accepted']} + duplicates {c['duplicates']} + "
         f"pairs_quarantined {c['pairs_quarantined']}",
         c["pairs"] == c["accepted"] + c["duplicates"] + c["pairs_quarantined"]),
        (f"accepted {c['accepted']} = train {c['train']} + test {c['test']}",
         c["accepted"] == c["train"] + c["test"]),
    ]


def _fmt_pct(d: dict) -> str:
    if not d.get("count"):
        return "-"
    return " ".join(f"{k}={d[k]}" for k in ("min", "p5", "p50", "p90", "p99", "max", "mean") if k in d)


def _show(args, home) -> int:
    path = store.resolve(args.ref, home)
    m = store.read_manifest(path)
    c = m["counts"]
    recon = reconciliation(c)
    out = {
        "name": m["name"], "version": m["version"], "path": str(path), "kind": m.get("kind", "pairs"),
        "format": m["format"],
        "created": m["created"], "content_hash": m["content_hash"], "schema_version": m["schema_version"],
        **{k: c[k] for k in ("rows_in", "accepted", "duplicates", "quarantined", "train", "test")},
        "counts": c,
        "reconciles": all(ok for _, ok in recon),
        "sources": m["sources"],
        "quarantine_reasons": m["quarantine_reasons"],
        "options": m.get("options", {}),
        "resolved_options": m.get("resolved_options", {}),
        "warnings": _warnings(m),
        "stats": dict(m["stats"]),
    }
    if args.tokenizer:
        from transformers import AutoTokenizer

        from reward_data import read_split

        tok = AutoTokenizer.from_pretrained(args.tokenizer, trust_remote_code=False)
        records = (r for split in ("train", "test") for r in read_split(path, split))
        out["stats"].update(token_stats(records, tok))
    if args.json:
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    s = out["stats"]
    kind = m.get("kind", "pairs")
    print(f"{m['name']}:{m['version']}  kind={kind}  format={m['format']}  created={m['created']}  "
          f"schema={m['schema_version']}")
    if kind == "unpaired":
        print("  (an unpaired dataset: the 'pairs' counts below count labelled completions)")
    print(f"  path {path}")
    print(f"  content_hash {m['content_hash']}")
    opts = out["options"]
    if opts:
        shown = {k: v for k, v in opts.items() if k != "mapping"}
        print("  options: " + " ".join(f"{k}={_fmt_opt(v)}" for k, v in shown.items()))
        if opts.get("mapping"):
            print("  mapping: " + " ".join(f"{k}={v}" for k, v in opts["mapping"].items()))
    res = out["resolved_options"]
    if res:
        flat = res if "format" in res else None
        if flat is not None:
            print("  resolved: " + " ".join(f"{k}={_fmt_opt(v)}" for k, v in flat.items()))
        else:
            for src_name, r in res.items():
                print(f"  resolved [{src_name}]: " + " ".join(f"{k}={_fmt_opt(v)}" for k, v in r.items()))
    print(f"  rows_in {c['rows_in']}  accepted {c['accepted']}  duplicates {c['duplicates']}  "
          f"quarantined {c['quarantined']}  train {c['train']}  test {c['test']}")
    print("  reconciliation:")
    for line, ok in recon:
        print(f"    {line}  [{'ok' if ok else 'MISMATCH'}]")
    if c["rows_with_pairs"] == c["pairs"]:
        print(f"    rows_in {c['rows_in']} = accepted {c['accepted']} + duplicates {c['duplicates']} + "
              f"quarantined {c['quarantined']}  "
              f"[{'ok' if c['rows_in'] == c['accepted'] + c['duplicates'] + c['quarantined'] else 'MISMATCH'}]")
    print("  sources:")
    for src in m["sources"]:
        print(f"    {src['name']} ({src['format']}): rows_in {src['rows_in']} accepted {src['accepted']} "
              f"duplicates {src['duplicates']} quarantined {src['quarantined']}")
    if m["quarantine_reasons"]:
        print("  quarantine reasons:")
        for reason, n in m["quarantine_reasons"].items():
            print(f"    {reason}: {n}")
    print("  lengths (characters):")
    for key in ("prompt_chars", "chosen_chars", "rejected_chars", "completion_chars"):
        if key in s:
            print(f"    {key:<15} {_fmt_pct(s[key])}")
    for key in ("prompt_tokens", "chosen_tokens", "rejected_tokens"):
        if key in s:
            print(f"    {key:<15} {_fmt_pct(s[key])}")
    print(f"  prompt turns: {', '.join(f'{k}: {v}' for k, v in s['prompt_turns'].items()) or '-'}")
    if kind == "unpaired":
        print(f"  desirable: {s['desirable']}  undesirable: {s['undesirable']}  "
              f"with system prompt: {s.get('with_system', '-')}")
    else:
        print(f"  ties: {s['ties']} (tie rate {s['tie_rate']:.4f})  with margin: {s['with_margin']}  "
              f"with system prompt: {s.get('with_system', '-')}  empty rejected: {s.get('empty_rejected', '-')}")
    for line in out["warnings"]:
        print(f"  warning: {line}")
    return 0


def _fmt_opt(v) -> str:
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, ensure_ascii=False, separators=(",", ":"))
    return "default" if v is None else str(v)


def _quarantine(args, home) -> int:
    path = store.resolve(args.ref, home)
    shown = 0
    with open(path / "quarantine.jsonl", encoding="utf-8") as f:
        for line in f:
            entry = json.loads(line)
            if args.reason and entry["reason"] != args.reason:
                continue
            if args.limit is not None and shown >= args.limit:
                break
            shown += 1
            if args.json:
                sys.stdout.write(line)
                continue
            src = entry["source"]
            item = f" [{entry['item']}]" if entry.get("item") else ""
            # 1-based line (versions written before lines were recorded: the 0-based row + 1).
            print(f"{src['file']}:{src.get('line', src['row'] + 1)}{item}  {entry['reason']}: {entry['detail']}")
            if entry.get("raw"):
                raw = entry["raw"].replace("\n", "\\n")
                print(f"    {raw[:160]}{'...' if len(raw) > 160 else ''}")
    if not args.json:
        print(f"{shown} quarantined entr{'y' if shown == 1 else 'ies'} shown", file=sys.stderr)
    return 0
