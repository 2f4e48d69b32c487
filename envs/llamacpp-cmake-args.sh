#!/bin/sh
# CMAKE_ARGS for building llama-cpp-python's llama.cpp on this machine (`make setup-llamacpp`).
#
# On x86 every instruction-set option of ggml is set ON or OFF from the CPU's flags in /proc/cpuinfo, with
# GGML_NATIVE=OFF, and the AMX options are always OFF: ggml's AMX path (which -march=native turns on where the CPU
# has AMX) segfaulted in the first llama_decode of the embedded model's Q4_1 weights on an Intel Xeon with AMX
# (docs/setup.md).  Elsewhere (no x86 flags to read: ARM, macOS) the build stays tuned for the CPU (GGML_NATIVE=ON).
# $STREAMKV_CPU_FLAGS, where set, stands for the CPU's flags, as in streamkv.cpu (a build for another CPU).
if [ -n "${STREAMKV_CPU_FLAGS+set}" ]; then
  flags="flags : $STREAMKV_CPU_FLAGS"
else
  flags=$(grep -m1 "^flags" "${CPUINFO:-/proc/cpuinfo}" 2>/dev/null)
fi
case "$flags" in
  *" avx2"*) ;;
  *) echo "-DGGML_NATIVE=ON"; exit 0 ;;
esac
has() { case "$flags " in *" $1 "*) echo ON ;; *) echo OFF ;; esac; }
avx512=OFF
if [ "$(has avx512f)$(has avx512cd)$(has avx512vl)$(has avx512dq)$(has avx512bw)" = ONONONONON ]; then avx512=ON; fi
echo "-DGGML_NATIVE=OFF -DGGML_SSE42=$(has sse4_2) -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2)" \
  "-DGGML_FMA=$(has fma) -DGGML_F16C=$(has f16c) -DGGML_BMI2=$(has bmi2) -DGGML_AVX_VNNI=$(has avx_vnni)" \
  "-DGGML_AVX512=$avx512 -DGGML_AVX512_VBMI=$(has avx512vbmi) -DGGML_AVX512_VNNI=$(has avx512_vnni)" \
  "-DGGML_AVX512_BF16=$(has avx512_bf16) -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
