"""Without a GPU, Triton kernels run in Triton's CPU interpreter. Set before any kernel module is imported
(triton.jit reads it when a kernel is defined).

Under pytest-xdist each worker (and every server process its tests start, which inherit the environment)
gets its share of the cores for torch's intra-op threads instead of all of them. Two workers of two
OpenMP threads each on this 2-core VM spend their time spinning at each other's barriers: two copies of
test_engine_smollm2.py run side by side took 315 s with two threads each and 79 s with one. Tests of
the kernels' split over threads ask for more with the `cpu_threads` fixture."""
import os

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if os.environ.get("PYTEST_XDIST_WORKER") and _workers > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _workers))

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("OMP_NUM_THREADS"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case a plugin imported torch first

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(params=[1, 2], ids=lambda n: f"{n}thr")
def cpu_threads(request):
    """torch's intra-op threads for one test (the CPU kernels split their work over them), then back."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


# The longest test files first (seconds on this VM, two workers): pytest-xdist's --dist loadfile hands files
# to the workers in collection order, and test_train.py, collected near the end, was the run's tail on one
# worker while the other sat idle. Longest first keeps both busy to the end. The rest keep their order.
LONGEST_FIRST = ("test_train.py", "test_quant.py", "test_ray_serve.py", "test_merge.py", "test_lora_engine.py",
                 "test_chaos.py", "test_http_api.py", "test_engine_smollm2.py", "test_loader.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file is kept
