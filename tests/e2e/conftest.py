import pytest

from tests.helpers import require_kernel


@pytest.fixture(autouse=True)
def _kernel() -> None:
    require_kernel()
