"""The CUDA driver loader: what a launch needs, read from TVM's CUDA source and TIR; a clear reason without a GPU."""

from __future__ import annotations

import pytest
import torch

from optic.backend import cuda_driver

SOURCE = '''
extern "C" __global__ void __launch_bounds__(256) main_kernel(float* __restrict__ A_ptr, half* __restrict__ B_ptr, int n);
extern "C" __global__ void __launch_bounds__(256) main_kernel(float* __restrict__ A_ptr, half* __restrict__ B_ptr, int n) {
}
'''


def test_entries_are_read_once_with_buffer_names_and_pointer_kinds():
    assert cuda_driver.kernel_entries(SOURCE) == [("main_kernel", (("A", True), ("B", True), ("n", False)))]


def test_grid_and_block_come_from_either_spelling_of_the_tir():
    scheduled = 'for i in T.thread_binding(12, thread="blockIdx.x"):\n for t in T.thread_binding(256, thread="threadIdx.x"):'
    lowered = 'T.launch_thread("blockIdx.x", T.int64(12))\nT.launch_thread("threadIdx.y", 4)\nT.launch_thread("threadIdx.x", 64)'
    a = cuda_driver.launch_of(SOURCE, scheduled, 1024)
    assert (a.kernel, a.grid, a.block, a.dynamic_smem) == ("main_kernel", (12, 1, 1), (256, 1, 1), 1024)
    b = cuda_driver.launch_of(SOURCE, lowered, 0)
    assert (b.grid, b.block) == ((12, 1, 1), (64, 4, 1))
    with pytest.raises(ValueError, match="one __global__ function"):
        cuda_driver.launch_of(SOURCE + SOURCE.replace("main_kernel", "other_kernel"), scheduled, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_the_reason_is_given_not_raised():
    assert cuda_driver.unavailable() == "PyTorch sees no CUDA GPU here"
