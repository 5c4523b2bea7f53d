"""Test setup: which backends run here, on which device.

Without a GPU the Triton kernels run through Triton's interpreter, which must be switched on before
triton is first imported: hence the environment is set here, before torch and appo_kernels load.
"""

import os

# the Triton interpreter runs tl.dot through numpy: one BLAS thread, or it fights torch's for the
# two cores (set before numpy and torch load)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402  (importing torch does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # the tests' tensors are small: several threads only spin-wait on each other
    torch.set_num_threads(1)

from appo_kernels import _backend  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"


def available_backends() -> list[str]:
    names = ["torch"]
    if _backend.TRITON_VERSION is not None and (ON_GPU or _backend.triton_interpret()):
        names.append("triton")
    if ON_GPU and _backend.cuda_extension_available():
        names.append("cuda")
    return names


BACKENDS = available_backends()


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Runs the test once per backend available here, forcing it with APPO_BACKEND."""
    monkeypatch.setenv("APPO_BACKEND", request.param)
    return request.param


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs on every run; a failure prints the seed, APPO_TEST_SEED replays it."""
    seed = int(os.environ.get("APPO_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            report.sections.append(("seed", f"replay with APPO_TEST_SEED={seeds[0]}"))


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    """A private model cache (APPO_CACHE) with the embedded model built once for the module."""
    from appo import models

    path = tmp_path_factory.mktemp("appo-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("APPO_CACHE", str(path))
        models.default_model_dir()
    return path
