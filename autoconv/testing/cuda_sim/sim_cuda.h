// The CUDA simulator's built-ins (a test double: semantics, never speed). Included before a
// rendered .cu source, which g++ then compiles as C++17 with OpenMP and AddressSanitizer.
// A block runs as one OpenMP team with one thread per CUDA thread; blocks run one after another,
// so __shared__ (a function-local static) is the block's own shared memory, and __syncthreads()
// is the team's barrier. Launched through sim_launch_<entry>, which SIM_ENTRY defines.
#pragma once
#include <math.h>
#include <omp.h>

#include <cmath>
#include <cstddef>
#include <cstring>
#include <type_traits>
#include <utility>

struct sim_uint3 {
    unsigned x, y, z;
};

static thread_local sim_uint3 threadIdx;
static sim_uint3 blockIdx, blockDim, gridDim;

#define __global__
#define __device__ static inline
#define __forceinline__ inline
// A kernel's shared arrays are its function-local statics (symbols _ZZ<entry>E...): AddressSanitizer
// puts redzones around them, and the simulator sums their sizes to refuse a kernel that asks for
// more than a block may have (48 KiB), as ptxas does.
#define __shared__ static
// __restrict__ is g++'s own.

static inline void __syncthreads() {
#pragma omp barrier
}

static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }

namespace sim {

constexpr unsigned MAX_THREADS_PER_BLOCK = 1024;

template <typename... A, std::size_t... I>
void call_with(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<A>*>(args[I])...);
}

// 'p' for a pointer parameter, 'i' for an int: what the worker checks a launch's arguments against.
template <typename... A>
const char* signature(void (*)(A...)) {
    static_assert(((std::is_pointer<A>::value || std::is_same<std::remove_cv_t<A>, int>::value) && ...),
                  "simulated kernels take pointers and ints only");
    static const char kinds[] = {(std::is_pointer<A>::value ? 'p' : 'i')..., '\0'};
    return kinds;
}

// 0: ran; 1: a block of 0 or more than 1024 threads; 2: OpenMP gave a smaller team than asked.
template <typename... A>
int launch(void (*kernel)(A...), const unsigned* grid, const unsigned* block, void** args) {
    const unsigned threads = block[0] * block[1] * block[2];
    if (threads == 0 || threads > MAX_THREADS_PER_BLOCK || grid[0] * grid[1] * grid[2] == 0) return 1;
    gridDim = {grid[0], grid[1], grid[2]};
    blockDim = {block[0], block[1], block[2]};
    omp_set_dynamic(0);
    int short_team = 0;
    for (unsigned z = 0; z < grid[2]; ++z)
        for (unsigned y = 0; y < grid[1]; ++y)
            for (unsigned x = 0; x < grid[0]; ++x) {
                blockIdx = {x, y, z};
#pragma omp parallel num_threads(threads)
                {
                    if ((unsigned)omp_get_num_threads() != threads) {
#pragma omp atomic write
                        short_team = 1;
                    } else {
                        const unsigned t = (unsigned)omp_get_thread_num();
                        threadIdx = {t % block[0], (t / block[0]) % block[1], t / (block[0] * block[1])};
                        call_with(kernel, args, std::index_sequence_for<A...>{});
                    }
                }
                if (short_team) return 2;
            }
    return 0;
}

}  // namespace sim

#define SIM_ENTRY(name)                                                                          \
    extern "C" int sim_launch_##name(const unsigned* grid, const unsigned* block, void** args) { \
        return sim::launch(name, grid, block, args);                                             \
    }                                                                                            \
    extern "C" const char* sim_signature_##name() { return sim::signature(name); }
