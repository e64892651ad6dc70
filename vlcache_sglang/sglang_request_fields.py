"""Every field of an SGLang 0.5.23 request (``GenerateReqInput`` and its ``SamplingParams``) under
``--attention-backend vlcache``: the launch-flag rule (:mod:`vlcache_sglang.sglang_flags`) for requests.

``sglang_request_fields.tsv`` (next to this module) holds one row per field (105):

- ``served``: works with compression (or is served as stock with a reason code in ``meta_info``);
  ``tests`` names where it is shown. ``refused_with``, when given, is a value that is a 400.
- ``refused``: a 400 in the HTTP process (:func:`vlcache_sglang.launch_hooks.check_generate_request`,
  :func:`~vlcache_sglang.launch_hooks.check_sampling_params`); ``refused_with`` holds request fields
  that are refused (sampling parameters for ``SamplingParams.*`` rows), ``tests`` the server test.
- ``needs-flag``: acts only with the launch flag ``flag`` (a ``ServerArgs`` field), whose row in
  ``sglang_flags.tsv`` applies (a refused flag makes the field unreachable).
- ``upstream``: acts before the plugin sees the request, on how media becomes tokens or on the
  prompt's radix key, and reaches it only through what it reads for every request (image spans,
  token ids); ``tests`` names the test of that path.
- ``no-kv-effect``: logits, output formatting, metrics, routing, or never read.
- ``other-models``: read only by another model family's processor (named in the note).

``tests/unit/test_sglang_request_fields.py`` fails when SGLang adds, renames or drops a field, when a
refused value is accepted, or when a named test or flag is gone; ``docs/sglang-request-fields.md``
is rendered from the table: ``python -m vlcache_sglang.sglang_request_fields --write
docs/sglang-request-fields.md``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Mapping

from vlcache_sglang.sglang_flags import kind_counts, node_ids, page_row, read_rows, write_page

TABLE = Path(__file__).with_name("sglang_request_fields.tsv")
REQUEST, SAMPLING = "GenerateReqInput", "SamplingParams"


class Support(str, Enum):
    SERVED = "served"
    REFUSED = "refused"
    NEEDS_FLAG = "needs-flag"
    UPSTREAM = "upstream"
    NO_KV_EFFECT = "no-kv-effect"
    OTHER_MODELS = "other-models"


@dataclass(frozen=True)
class FieldSupport:
    """One request field (``GenerateReqInput.x`` or ``SamplingParams.x``) and the evidence."""

    field: str
    support: Support
    tests: tuple[str, ...]  # pytest node ids (path::function)
    refused_with: dict[str, Any] | None  # fields of a request (or sampling parameters) that get a 400
    flag: str  # needs-flag: the ServerArgs field it needs
    note: str


def load(path: Path = TABLE) -> dict[str, FieldSupport]:
    """The table, by qualified field name (file order kept)."""
    return {name: FieldSupport(name, Support(row["support"]), node_ids(row["tests"]),
                               json.loads(row["refused_with"]) if row["refused_with"] else None, row["flag"], row["note"])
            for name, row in read_rows(path).items()}


def sglang_fields() -> list[str]:
    """The installed SGLang's request fields, qualified, in its order."""
    import dataclasses

    from sglang.srt.managers.io_struct import GenerateReqInput
    from sglang.srt.sampling.sampling_params import SamplingParams

    return [f"{REQUEST}.{f.name}" for f in dataclasses.fields(GenerateReqInput)] + \
        [f"{SAMPLING}.{name}" for name in SamplingParams.__struct_fields__]


def render_markdown(table: Mapping[str, FieldSupport]) -> str:
    """docs/sglang-request-fields.md: counts, then every field in SGLang's order."""
    lines = [
        "# SGLang's request fields under `--attention-backend vlcache`",
        "",
        "Generated from `vlcache_sglang/sglang_request_fields.tsv` by `python -m vlcache_sglang.sglang_request_fields "
        "--write docs/sglang-request-fields.md`; `tests/unit/test_sglang_request_fields.py` checks that it covers every "
        "field of the installed SGLang's `GenerateReqInput` and `SamplingParams`, that each refused value is a 400 "
        "and that each named test and flag exists. What the kinds mean: `vlcache_sglang/sglang_request_fields.py`; "
        "the launch flags: [sglang-flags.md](sglang-flags.md).",
        "",
        *kind_counts(table, Support),
        "",
        "| field | kind | note | evidence |", "|---|---|---|---|",
    ]
    for r in table.values():
        evidence = []
        if r.refused_with:
            evidence.append("400: `" + json.dumps(r.refused_with) + "`")
        if r.flag:
            evidence.append(f"needs `{r.flag}`")
        lines.append(page_row(r, evidence))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    write_page(lambda: render_markdown(load()), __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
