"""Every field of SGLang 0.5.23's ``ServerArgs``, and what it means under ``--attention-backend vlcache``.

The project's rule for SGLang's features: each works with compression, with a test, or the launch
refuses it naming the flag and what to do instead. ``sglang_flags.tsv`` (next to this module) holds
that for all 546 fields, one row each, so none is silently unknown:

- ``served``: works with compression; ``tests`` names where it is shown. Values listed in
  ``refused_with`` (e.g. ``--radix-eviction-policy tlru``) are refused.
- ``refused``: :func:`vlcache_sglang.compatibility.refusals` stops the launch; ``refused_with`` is
  a launch that sets it.
- ``no-kv-effect``: cannot reach the KV pool, the allocator, ``req_to_token``, the radix tree, the
  attention backend or which tokens a batch holds (HTTP, logging, tokenizer, weight loading, ...).
- ``other-models``: acts only for a model family or feature named in the note (MoE experts, MLA,
  mamba, sliding-window hybrids, speculative decoding, ...); models whose KV pool vlcache cannot
  compact stop at start-up (``check_pool_class``, the radix cache's hybrid refusal).
- ``sub-option``: acts only when ``parent`` is set; that field's row applies.

``tests/unit/test_sglang_flags.py`` fails when SGLang adds, renames or drops a field, when a
refused row's launch is not refused, or when a named test is gone; ``docs/sglang-flags.md`` is
rendered from the table: ``python -m vlcache_sglang.sglang_flags --write docs/sglang-flags.md``.
"""
from __future__ import annotations

import argparse
import csv
import re
import shlex
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

TABLE = Path(__file__).with_name("sglang_flags.tsv")


class Support(str, Enum):
    SERVED = "served"
    REFUSED = "refused"
    NO_KV_EFFECT = "no-kv-effect"
    OTHER_MODELS = "other-models"
    SUB_OPTION = "sub-option"


@dataclass(frozen=True)
class FlagSupport:
    """One ``ServerArgs`` field: how vlcache serves it and the evidence."""

    field: str
    support: Support
    tests: tuple[str, ...]  # pytest node ids (path::function)
    refused_with: tuple[str, ...]  # launch arguments that are refused
    parent: str  # sub-option: the field it depends on
    note: str


def read_rows(path: Path) -> dict[str, dict[str, str]]:
    """A classification table's rows by their ``field`` (file order kept; a field twice is an error)."""
    out: dict[str, dict[str, str]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if row["field"] in out:
                raise ValueError(f"{path.name}: {row['field']} appears twice")
            out[row["field"]] = row
    return out


def node_ids(cell: str) -> tuple[str, ...]:
    """The pytest node ids of a ``tests`` cell (comma-separated)."""
    return tuple(t for t in cell.split(",") if t)


def coverage(table: Iterable[str], fields: Iterable[str]) -> tuple[list[str], list[str]]:
    """(fields the table lacks, table rows that are no longer fields)."""
    table, fields = list(table), list(fields)
    return [f for f in fields if f not in table], [f for f in table if f not in fields]


def load(path: Path = TABLE) -> dict[str, FlagSupport]:
    """The table, by field name (file order kept)."""
    return {name: FlagSupport(name, Support(row["support"]), node_ids(row["tests"]),
                              tuple(shlex.split(row["refused_with"])), row["parent"], row["note"])
            for name, row in read_rows(path).items()}


def missing_tests(nodes: Iterable[str], root: Path) -> list[str]:
    """The pytest node ids (``path::function``) among ``nodes`` whose function is not defined."""
    gone = []
    for node in nodes:
        path, _, name = node.partition("::")
        source = root / path
        if not source.is_file() or not re.search(rf"^\s*def {re.escape(name)}\(", source.read_text(), re.M):
            gone.append(node)
    return gone


def cli_spellings() -> dict[str, str]:
    """Field name -> the flag(s) SGLang's parser accepts for it (``(none)`` for internal fields)."""
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    out: dict[str, list[str]] = {}
    for action in parser._actions:
        out.setdefault(action.dest, []).extend(s for s in action.option_strings if s.startswith("--"))
    return {k: " / ".join(dict.fromkeys(v)) for k, v in out.items()}


def render_markdown(table: Mapping[str, FlagSupport], spellings: Mapping[str, str]) -> str:
    """docs/sglang-flags.md: counts, then every field in SGLang's order."""
    lines = [
        "# SGLang's flags under `--attention-backend vlcache`",
        "",
        "Generated from `vlcache_sglang/sglang_flags.tsv` by `python -m vlcache_sglang.sglang_flags --write "
        "docs/sglang-flags.md`; `tests/unit/test_sglang_flags.py` checks that it covers every `ServerArgs` field of "
        "the installed SGLang, that each refused launch is refused and that each named test exists. "
        "What the kinds mean: `vlcache_sglang/sglang_flags.py`.",
        "",
        *kind_counts(table, Support),
        "",
        "| field | flag | kind | note | evidence |", "|---|---|---|---|---|",
    ]
    for r in table.values():
        evidence = []
        if r.refused_with:
            evidence.append("refused: `" + " ".join(r.refused_with) + "`")
        if r.parent:
            evidence.append(f"under `{r.parent}`")
        lines.append(page_row(r, evidence, spellings.get(r.field) or "(none)"))
    return "\n".join(lines) + "\n"


def kind_counts(table: Mapping[str, Any], kinds: Iterable[Enum], rows: str = "fields") -> list[str]:
    """A page's table of how many ``rows`` each kind (``support``) has, in the kinds' order."""
    return [f"| kind | {rows} |", "|---|---|",
            *[f"| {k.value} | {sum(r.support is k for r in table.values())} |" for k in kinds]]


def page_row(row: Any, evidence: Iterable[str], *columns: str) -> str:
    """One row of a classification page: the name, ``columns``, the kind, the note (pipes
    escaped), then the evidence: the row's named tests and ``evidence``."""
    cells = [f"`{row.field}`", *columns, row.support.value, row.note.replace("|", "\\|"),
             "; ".join([*(f"`{t}`" for t in row.tests), *evidence])]
    return "| " + " | ".join(cells) + " |"


def write_page(render: Callable[[], str], description: str, argv: list[str] | None = None) -> None:
    """The ``python -m`` entry of a classification page: write it (``--write PATH``) or print it."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--write", type=Path, help="write the markdown page here (default: print it)")
    args = ap.parse_args(argv)
    text = render()
    if args.write:
        args.write.write_text(text)
    else:
        print(text, end="")


def main(argv: list[str] | None = None) -> None:
    write_page(lambda: render_markdown(load(), cli_spellings()), __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
