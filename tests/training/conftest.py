import pytest

from ..conftest import reset_accelerate


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Every training test builds its own Accelerator; none inherits another's state."""
    reset_accelerate()
    yield
    reset_accelerate()
