// Runtime choice of the instruction set of the CPU kernels.
//
// The library is built with the compiler's default flags (no -march=native), so it runs on any x86-64 CPU. Each
// kernel comes in one version per instruction set, compiled for it with a target attribute (TINYCHAT_AVX512,
// TINYCHAT_AVX2), and picks one per call with current_isa(): the best the CPU has, or the lower one that the
// environment variable TINYCHAT_CPU_ISA names (avx512, avx2, scalar), so tests cover every path on one machine. The
// avx512_vnni level differs from avx512 in int4_linear and int8_linear alone, which may then round activations to
// int8 (vnni_gemv.h, int4_linear.cpp). On other architectures (ARM) only the portable path exists, which the compiler
// vectorizes for the target (NEON).
#pragma once

#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define TINYCHAT_X86 1
#define TINYCHAT_AVX2 __attribute__((target("avx2,fma,f16c")))
#define TINYCHAT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,prefer-vector-width=512")))
#define TINYCHAT_AVX512_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,prefer-vector-width=512")))
#endif

// For kernel bodies written once and instantiated inside each target-attributed entry point: inlined there, they
// are compiled for that entry point's instruction set.
#define TINYCHAT_INLINE inline __attribute__((always_inline))

namespace tinychat {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Vnni = 3 };  // ordered: a level implies those below

// The path to run: the best this CPU supports, or the lower one TINYCHAT_CPU_ISA asks for (read per call, so a
// test can switch it; a getenv is nothing next to a kernel). Raises for an unknown or unsupported value.
Isa current_isa();

// "avx512_vnni", "avx512", "avx2" or "scalar": the name of current_isa(), for the cpu_isa op of the registry.
std::string cpu_isa_name();

}  // namespace tinychat
