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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny models: on a shared 2-core runner extra
    threads only add overhead (and stall badly while another process is busy)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
