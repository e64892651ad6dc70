"""Every HTTP route of an SGLang 0.5.23 server under ``--attention-backend vlcache``: the launch-flag
rule (:mod:`vlcache_sglang.sglang_flags`) for the routes a user calls besides ``/generate``.

``sglang_routes.tsv`` (next to this module) holds one row per route path:

- ``served``: works with compression (or serves what reaches it as stock, with the reason code);
  ``tests`` names where it is shown; ``flag``, when given, is the launch flag that mounts or enables
  it (a ``ServerArgs`` field whose row in ``sglang_flags.tsv`` is not refused).
- ``needs-flag``: acts only with the launch flag ``flag``; the flag's row applies (a refused flag
  leaves SGLang's own error reply, e.g. "LoRA is not enabled").
- ``upstream``: SGLang changes the request before it reaches the plugin (``tests`` pins what
  arrives).
- ``no-kv-effect``: information, tokenizer, profiling, logging or weight read-back.
- ``other-models``: serves another model family (speech, MoE, a decision head).

``tests/unit/test_sglang_routes.py`` fails when SGLang adds or drops a route, when a named test or
flag is gone, or when a served route needs a refused flag; ``docs/sglang-routes.md`` is rendered
from the table: ``python -m vlcache_sglang.sglang_routes --write docs/sglang-routes.md``.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Mapping

from vlcache_sglang.sglang_flags import kind_counts, node_ids, page_row, read_rows, write_page

TABLE = Path(__file__).with_name("sglang_routes.tsv")
#: routes SGLang mounts only at launch, so they are not on its app at import time
MOUNTED_AT_LAUNCH = {"/metrics": "--enable-metrics", "/dumper/{method}": "DUMPER_SERVER_PORT=reuse"}


class Support(str, Enum):
    SERVED = "served"
    NEEDS_FLAG = "needs-flag"
    UPSTREAM = "upstream"
    NO_KV_EFFECT = "no-kv-effect"
    OTHER_MODELS = "other-models"


@dataclass(frozen=True)
class RouteSupport:
    """One route path (all of its methods) and the evidence."""

    field: str  # the path, as SGLang declares it
    support: Support
    tests: tuple[str, ...]  # pytest node ids (path::function)
    flag: str  # the ServerArgs field that enables it (needs-flag; optional for served)
    note: str


def load(path: Path = TABLE) -> dict[str, RouteSupport]:
    """The table, by route path (file order kept)."""
    return {name: RouteSupport(name, Support(row["support"]), node_ids(row["tests"]), row["flag"], row["note"])
            for name, row in read_rows(path).items()}


def sglang_routes() -> list[str]:
    """The paths of the installed SGLang's HTTP server (its FastAPI app and the routers it
    includes), in declaration order, then :data:`MOUNTED_AT_LAUNCH`."""
    from sglang.srt.entrypoints.http_server import app

    paths: list[str] = []

    def walk(routes) -> None:
        for route in routes:
            if hasattr(route, "path"):
                paths.append(route.path)
            elif hasattr(route, "original_router"):  # app.include_router(...)
                walk(route.original_router.routes)

    walk(app.routes)
    return list(dict.fromkeys([*paths, *MOUNTED_AT_LAUNCH]))


def render_markdown(table: Mapping[str, RouteSupport]) -> str:
    """docs/sglang-routes.md: counts, then every route in SGLang's order."""
    lines = [
        "# SGLang's HTTP routes under `--attention-backend vlcache`",
        "",
        "Generated from `vlcache_sglang/sglang_routes.tsv` by `python -m vlcache_sglang.sglang_routes "
        "--write docs/sglang-routes.md`; `tests/unit/test_sglang_routes.py` checks that it covers every route of "
        "the installed SGLang's HTTP server and that each named test and flag exists. What the kinds mean: "
        "`vlcache_sglang/sglang_routes.py`; the launch flags: [sglang-flags.md](sglang-flags.md); the fields of a "
        "request: [sglang-request-fields.md](sglang-request-fields.md).",
        "",
        *kind_counts(table, Support, rows="routes"),
        "",
        "| route | kind | note | evidence |", "|---|---|---|---|",
    ]
    for r in table.values():
        evidence = [f"needs `{r.flag}`"] if r.flag else []
        if r.field in MOUNTED_AT_LAUNCH:
            evidence.append(f"mounted with `{MOUNTED_AT_LAUNCH[r.field]}`")
        lines.append(page_row(r, evidence))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    write_page(lambda: render_markdown(load()), __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
