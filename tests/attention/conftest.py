"""The Triton kernels run on CPU tensors through the interpreter. Triton reads TRITON_INTERPRET when
a kernel is defined and again while it runs, so the variable is set while the kernels are imported
and around each test that uses them (`triton_interpreter`), and put back as it was after."""
import os

import pytest


def _set_interpret(value: str | None) -> str | None:
    saved = os.environ.get("TRITON_INTERPRET")
    if value is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = value
    return saved


def _import_kernels_interpreted() -> None:
    saved = _set_interpret("1")
    try:
        import tokenmill.attention.triton_backend  # noqa: F401
    except ImportError:
        pass                        # no triton: the tests that need it are skipped
    finally:
        _set_interpret(saved)


_import_kernels_interpreted()      # conftest loads before the test modules that import the kernels


@pytest.fixture
def triton_interpreter():
    saved = _set_interpret("1")
    yield
    _set_interpret(saved)
