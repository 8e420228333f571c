import pytest
import torch


def cuda_ready() -> bool:
    import fusedlm

    return torch.cuda.is_available() and fusedlm.cuda_available()


def pytest_collection_modifyitems(config, items):
    if cuda_ready():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and the CUDA build of fusedlm")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs each run, but reproducible from the printed seed on failure.
    import random

    seed = random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)
    print(f"torch.manual_seed({seed})  # reproduce this test's inputs")
    yield
