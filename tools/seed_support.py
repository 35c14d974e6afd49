"""The reference documents' model x method table, with what ithaca's tests checked.

Rendered into ``docs/models.md`` by ``tools.support_matrix`` from the same
records as the support matrix: a cell is "checked" when at least one passed parity check
of that family exercised the method, whatever the reference claims.
"""

from __future__ import annotations

METHODS = ["TeaCache", "Cache-DiT", "Ulysses-SP", "Ring-Attention", "CFG-Parallel"]

# model (as the reference names it) -> (ithaca's family name or None, reference's claims)
SEED_TABLE: dict[str, tuple[str | None, tuple[bool, ...]]] = {
    "LongCat-Image": ("LongCat-Image", (False, True, False, False, True)),
    "LongCat-Image-Edit": ("LongCat-Image-Edit", (False, True, False, False, True)),
    "Ovis-Image": ("Ovis-Image", (False, True, False, False, True)),
    "Qwen-Image": ("Qwen-Image", (True, True, True, True, True)),
    "Qwen-Image-2512": ("Qwen-Image-2512", (True, True, True, True, True)),
    "Qwen-Image-Edit": ("Qwen-Image-Edit", (True, True, True, True, True)),
    "Qwen-Image-Edit-2509": ("Qwen-Image-Edit-2509", (True, True, True, True, True)),
    "Qwen-Image-Layered": ("Qwen-Image-Layered", (False, True, True, True, True)),
    "Z-Image": ("Z-Image", (True, True, False, False, False)),
    "Stable-Diffusion3.5": ("SD3.5", (False, True, False, False, True)),
    "Bagel": ("Bagel", (True, True, False, False, False)),
    "FLUX.1-dev": ("FLUX.1-dev", (False, True, False, False, False)),
    "Wan2.2": ("Wan2.2-T2V-A14B", (False, True, True, True, True)),
}
EXTRA = {"Qwen-Image-Edit-2511": "Qwen-Image-Edit-2511"}
"""Checked here, not in the reference's table."""


def _uses(method: str, layout: str, cache: str) -> bool:
    if method == "TeaCache":
        return cache == "tea_cache"
    if method == "Cache-DiT":
        return cache == "cache_dit"
    if method == "Ulysses-SP":
        return "ulysses" in layout or layout.startswith("hybrid")
    if method == "Ring-Attention":
        return "ring" in layout or layout.startswith("hybrid")
    return layout.startswith("cfg")  # CFG-Parallel


def render(keys) -> str:
    """Markdown for ``keys``, the (family, layout, cache) cells that have a passed check."""
    keys = set(keys)
    lines = [
        "### The reference's model table",
        "",
        "Each cell: what the reference documents claim (`yes` / `no`), then whether a",
        "parity check above exercised the method for that model here (`checked`) or not",
        "(`not checked`, nothing claimed). Ulysses and Ring count hybrid layouts.",
        "",
        "| model | family here | " + " | ".join(METHODS) + " |",
        "|---|---|" + "---|" * len(METHODS),
    ]
    rows = [(m, fam, claims) for m, (fam, claims) in SEED_TABLE.items()]
    rows += [(m, fam, None) for m, fam in EXTRA.items()]
    for model, family, claims in rows:
        cells = []
        for i, method in enumerate(METHODS):
            done = family is not None and any(
                f == family and _uses(method, layout, cache) for f, layout, cache in keys
            )
            claim = "" if claims is None else ("yes / " if claims[i] else "no / ")
            cells.append(claim + ("checked" if done else "not checked"))
        lines.append(f"| {model} | {family or 'no pipeline'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
