// Programmatic dependent launch (compute capability 9.0+; no-ops below). A kernel launched with
// programmatic stream serialization may start while the previous kernel of its stream still
// runs, once every block of that kernel has called pdl_launch_dependents() or exited. Before
// pdl_wait() it may only read what no earlier kernel writes (weights, their indexes) and must
// not write global memory at all; pdl_wait() returns when the previous kernel has finished and
// its writes are visible. Launched normally, pdl_wait() returns at once.

__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
