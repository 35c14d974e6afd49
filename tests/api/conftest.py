from tests.models.conftest import tiny_checkpoints  # noqa: F401 - the shared tiny checkpoints
