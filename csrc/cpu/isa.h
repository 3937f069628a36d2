// The instruction set of the CPU kernels (csrc/cpu/int4_linear.cpp), for the cpu_isa op of the registry.
#pragma once

#include <string>

namespace tinychat {

// "avx512", "avx2" or "scalar": the best this CPU supports, or the lower one TINYCHAT_CPU_ISA names.
std::string cpu_isa_name();

}  // namespace tinychat
