"""Read the seed documents' code blocks (``../shared/seeds/*.md`` from the repo root).

``python_snippets()`` and ``commands()`` return what the documents contain, keyed by
``file#index`` so a failing test names the block. The only rewrites are the ones a user
of ithaca makes: the import lines (:data:`IMPORTS`) and the program names
(:data:`PROGRAMS`).
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

# ``$ITHACA_SEEDS`` overrides the location (e.g. a worktree that is not beside shared/).
SEEDS = Path(
    os.environ.get("ITHACA_SEEDS") or Path(__file__).resolve().parents[2].parent / "shared/seeds"
)

# The reference package's module paths -> ithaca's (import lines only).
IMPORTS = {
    "from vllm_omni.inputs.data import": "from ithaca import",
    "from vllm_omni.diffusion.data import": "from ithaca import",
    "from vllm_omni import": "from ithaca import",
    "vllm_omni.diffusion.distributed.sp_plan": "ithaca.parallel.sp_plan",
    "vllm_omni.diffusion.distributed.sp_sharding": "ithaca.parallel.sharding",
}

# The reference programs -> ithaca subcommands.
PROGRAMS = {
    ("vllm", "serve"): ["serve"],
    ("python", "examples/offline_inference/text_to_image/text_to_image.py"): ["generate"],
    ("python", "text_to_image.py"): ["generate"],
}

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


@dataclass(frozen=True)
class Block:
    key: str
    """``file.md#n`` (python) or ``file.md#diffn``: the n-th block of its language."""
    language: str
    text: str


def available() -> bool:
    return SEEDS.is_dir() and any(SEEDS.glob("*.md"))


def blocks(language: str) -> list[Block]:
    out = []
    for path in sorted(SEEDS.glob("*.md")):
        n = 0
        for match in _FENCE.finditer(path.read_text()):
            if match.group(1) == language:
                tag = "" if language == "python" else language
                out.append(Block(f"{path.name}#{tag}{n}", language, match.group(2)))
                n += 1
    return out


def rewrite_imports(code: str) -> str:
    lines = []
    for line in code.splitlines():
        if line.lstrip().startswith(("from vllm_omni", "import vllm_omni")):
            for old, new in IMPORTS.items():
                line = line.replace(old, new)
        lines.append(line)
    return "\n".join(lines) + "\n"


def python_snippets() -> list[Block]:
    """Python blocks, and diff blocks as the code they leave (``+`` and context lines)."""
    out = [Block(b.key, "python", rewrite_imports(b.text)) for b in blocks("python")]
    for b in blocks("diff"):
        # the seeds' diffs mark added lines with "+" and leave context lines unprefixed
        kept = [line.removeprefix("+") for line in b.text.splitlines() if line[:1] != "-"]
        out.append(Block(b.key, "diff", rewrite_imports("\n".join(kept))))
    return out


def commands() -> list[tuple[str, list[str]]]:
    """``(key, argv)`` of every command line in bash blocks, continuations joined."""
    out = []
    for b in blocks("bash"):
        text = b.text.replace("\\\n", " ")
        for i, line in enumerate(text.splitlines()):
            line = line.strip()
            if line and not line.startswith("#"):
                out.append((f"{b.key}:{i}", shlex.split(line)))
    return out


def to_ithaca(argv: list[str]) -> list[str] | None:
    """The ithaca argv for a reference command line, or None if it is not one of ours."""
    for program, sub in PROGRAMS.items():
        if tuple(argv[: len(program)]) == program:
            return sub + argv[len(program) :]
    return None
