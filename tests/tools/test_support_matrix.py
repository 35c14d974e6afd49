"""The support matrix of docs/models.md is generated, not written by hand.

No model runs here: the committed table must be exactly what the committed records
(``docs/support-records.jsonl``, written by ``python -m tools.support_matrix``)
render to, and the renderer is checked on a small fixture.
"""

from tools import support_matrix as sm

FIXTURE = [
    dict(family="Z-Image", layout="ulysses2", cache="none", latent_err=1e-6, image_diff=0),
    dict(family="Z-Image", layout="ulysses2", cache="none", latent_err=3e-6, image_diff=1),
    dict(family="Qwen-Image", layout="1 rank vs diffusers", cache="none", latent_err=0.0,
         image_diff=0),
    dict(family="Qwen-Image", layout="ring2", cache="tea_cache", latent_err=2e-6, image_diff=1),
    dict(family="Qwen-Image", layout="odd9", cache="none", latent_err=5e-6, image_diff=1),
]  # fmt: skip


def test_render_takes_the_worst_check_per_cell_and_one_table_per_cache():
    text = sm.render(sm.load(FIXTURE))
    assert "| family | 1 rank vs diffusers | ulysses2 | odd9 |" in text  # known order first
    assert "| Qwen-Image | 0.0e+00 / 0 | - | 5.0e-06 / 1 |" in text  # families in order
    assert "| Z-Image | - | 3.0e-06 / 1 | - |" in text  # the worse of two checks
    assert "### Cache method: `tea_cache`" in text
    assert "| Qwen-Image | 2.0e-06 / 1 |" in text
    assert "Cache method `cache_dit`: no family tested." in text
    assert "- `odd9`: see the test that records it" in text


def test_replace_generated_keeps_the_prose_around_the_markers():
    doc = f"# Title\n\nintro\n\n{sm.BEGIN}\nold table\n{sm.END}\n\n## Prose\n"
    new = sm.replace_generated(doc, "new table")
    assert new == f"# Title\n\nintro\n\n{sm.BEGIN}\nnew table\n\n{sm.END}\n\n## Prose\n"
    assert sm.generated_part(new) == "new table"


def test_committed_table_is_what_the_committed_records_render_to():
    records = sm.read_records(sm.RECORDS)
    assert sm.generated_part(sm.DOC.read_text()) == sm.render(sm.load(records))
    assert sm.RECORDS.read_text() == sm.sorted_records(records)
    for r in records:  # every recorded column has a legend entry
        assert r["layout"] in sm.LAYOUTS, r
        assert set(r) == {"family", "layout", "cache", "latent_err", "image_diff"}
