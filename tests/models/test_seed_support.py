"""The reference's model x method table in docs/models.md: checked only where a record is."""

from tools import seed_support


def test_a_cell_is_checked_only_by_a_record_of_its_family_and_method():
    keys = {
        ("Qwen-Image-Edit", "hybrid2x2", "none"),  # counts for Ulysses and Ring
        ("Qwen-Image-Edit", "cfg2", "tea_cache"),  # CFG-Parallel and TeaCache
        ("SD3.5", "ulysses2", "cache_dit"),
    }
    text = seed_support.render(keys)
    edit = next(line for line in text.splitlines() if line.startswith("| Qwen-Image-Edit |"))
    assert edit == (
        "| Qwen-Image-Edit | Qwen-Image-Edit | yes / checked | yes / not checked | "
        "yes / checked | yes / checked | yes / checked |"
    )
    sd = next(line for line in text.splitlines() if line.startswith("| Stable-Diffusion3.5 |"))
    assert sd.split(" | ")[2:5] == ["no / not checked", "yes / checked", "no / checked"]
    assert "| Bagel | Bagel | yes / not checked |" in text
    assert len([line for line in text.splitlines() if line.startswith("| ")]) == 1 + 14
