"""Compatibility names (one session) for :mod:`tests.models.harness`, the one generate
harness; ``generate`` here is ``harness.generate_video``. Import from tests.models.harness."""

from tests.models.harness import FAMILIES, KINDS, max_frame_diff, run_pipeline, tiny_wan_paths
from tests.models.harness import generate_video as generate

__all__ = ["FAMILIES", "KINDS", "generate", "max_frame_diff", "run_pipeline", "tiny_wan_paths"]
