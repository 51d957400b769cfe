// launch.cuh: the opening every kernel launched through kernels/launch.py makes.
//
// While a decode step is captured into a CUDA graph, launch.py launches kernels as programmatic
// dependent launches (sm_90): a kernel's CTAs may be scheduled while the previous kernel in the stream
// is still finishing, instead of after it has drained (measured: bench/results/step_profile_*_pdl.json,
// SmolLM2's decode step ~10% shorter). So a kernel must wait here before it reads anything an
// earlier kernel wrote, and before it writes any global memory (a write could race the previous kernel's
// reads); before the wait it may read what no kernel of the step writes (weights) and use its shared
// memory. Once through, it lets the next kernel be scheduled: that one only runs up to its own wait, and
// since this kernel passed its wait the one before it has finished, so every earlier kernel's writes
// are visible to every later one. Outside such a launch both instructions return at once.
// It follows that a kernel may read before its wait what the kernel two launches back (or any earlier
// one) wrote: it is launched only once every CTA of the previous kernel has passed its own wait, and that
// wait returned once the kernel before it had finished (pk_merge_window attends to the window there).
#pragma once

__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
