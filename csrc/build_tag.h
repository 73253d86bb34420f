// The build tag of a built part, read from its file by
// convit_kernels/extension_loader.py (build_tag) before it loads it: built on
// the stable ABI, against which torch, and the oldest torch it loads on
// (convit_kernels/build_config.py: tag_flags). Included by exactly one source
// file of each part (gpsa_cpu.cpp, gpsa_cuda.cu).
#pragma once

#define CONVIT_KERNELS_STR2(x) #x
#define CONVIT_KERNELS_STR(x) CONVIT_KERNELS_STR2(x)
extern "C" __attribute__((used, visibility("default"))) const char convit_kernels_build_tag[] =
    "CONVIT_KERNELS_BUILD_TAG{abi=stable;torch=" CONVIT_KERNELS_STR(CONVIT_KERNELS_TORCH_MAJOR) "." CONVIT_KERNELS_STR(
        CONVIT_KERNELS_TORCH_MINOR) "." CONVIT_KERNELS_STR(CONVIT_KERNELS_TORCH_PATCH) ";min_torch="
        CONVIT_KERNELS_STR(CONVIT_KERNELS_TARGET_MAJOR) "." CONVIT_KERNELS_STR(CONVIT_KERNELS_TARGET_MINOR) "}";
