// Runtime choice of the CPU kernels' instruction set (see isa.h).

#include "isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace tinychat {

namespace {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Vnni: return "avx512_vnni";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

Isa best_isa() {
#ifdef TINYCHAT_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return __builtin_cpu_supports("avx512vnni") ? Isa::kAvx512Vnni : Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

}  // namespace

Isa current_isa() {
  const Isa best = best_isa();
  const char* env = std::getenv("TINYCHAT_CPU_ISA");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "native") == 0) return best;
  Isa wanted;
  if (std::strcmp(env, "avx512_vnni") == 0) {
    wanted = Isa::kAvx512Vnni;
  } else if (std::strcmp(env, "avx512") == 0) {
    wanted = Isa::kAvx512;
  } else if (std::strcmp(env, "avx2") == 0) {
    wanted = Isa::kAvx2;
  } else if (std::strcmp(env, "scalar") == 0) {
    wanted = Isa::kScalar;
  } else {
    TORCH_CHECK(false, "TINYCHAT_CPU_ISA must be native, avx512_vnni, avx512, avx2 or scalar, got '", env, "'");
  }
  TORCH_CHECK(static_cast<int>(wanted) <= static_cast<int>(best), "TINYCHAT_CPU_ISA=", env,
              " but this CPU supports at most ", isa_name(best));
  return wanted;
}

std::string cpu_isa_name() { return isa_name(current_isa()); }

}  // namespace tinychat
