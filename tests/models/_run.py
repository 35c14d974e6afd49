"""Compatibility names (one session) for :mod:`tests.models.harness`, the one generate
harness; ``generate`` here is ``harness.generate_fused``. Import from tests.models.harness."""

from tests.models.harness import cancel_after_first_step, fail_on_rank0, stepwise_join
from tests.models.harness import generate_fused as generate

__all__ = ["cancel_after_first_step", "fail_on_rank0", "generate", "stepwise_join"]
