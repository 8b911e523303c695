# Cross build for 64-bit ARM Linux (Jetson-class boards: Orin, Thor) with the GNU cross compiler of
# Debian/Ubuntu (apt-get install g++-aarch64-linux-gnu; its libraries live in /usr/aarch64-linux-gnu).
#
#   cmake -S . -B build/aarch64 --toolchain cmake/toolchains/aarch64-linux-gnu.cmake \
#         -DCM_DEPLOY_WITH_CUDA=OFF -DCM_DEPLOY_BUILD_TRT_PLUGIN=OFF -DONNXRUNTIME_ROOT=$PWD/build/ort
#
# scripts/build_aarch64.sh does it all (docs/jetson.md). CM_AARCH64_PREFIX overrides the compiler prefix
# (e.g. a Linaro or JetPack cross toolchain), CM_AARCH64_ROOT where its target libraries live.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(CM_AARCH64_PREFIX "aarch64-linux-gnu-" CACHE STRING "cross compiler prefix (CM_AARCH64_PREFIX)")
if(DEFINED ENV{CM_AARCH64_PREFIX})
  set(CM_AARCH64_PREFIX "$ENV{CM_AARCH64_PREFIX}" CACHE STRING "" FORCE)
endif()
set(CM_AARCH64_ROOT "/usr/aarch64-linux-gnu" CACHE PATH "target libraries (the emulator's -L) (CM_AARCH64_ROOT)")
if(DEFINED ENV{CM_AARCH64_ROOT})
  set(CM_AARCH64_ROOT "$ENV{CM_AARCH64_ROOT}" CACHE PATH "" FORCE)
endif()
set(CMAKE_C_COMPILER "${CM_AARCH64_PREFIX}gcc")
set(CMAKE_CXX_COMPILER "${CM_AARCH64_PREFIX}g++")
# nvcc compiles host code with the cross compiler; FindCUDAToolkit then uses the CUDA toolkit's
# targets/aarch64-linux (JetPack's cross-compile package installs it) when it exists.
set(CMAKE_CUDA_HOST_COMPILER "${CM_AARCH64_PREFIX}g++")

# Libraries and CMake packages only from the target's root (an x86 GoogleTest or libonnxruntime must
# not be picked up); headers from anywhere: ONNX Runtime's and TensorRT's are architecture independent.
set(CMAKE_FIND_ROOT_PATH "${CM_AARCH64_ROOT}")
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE BOTH)

# ctest and try_run run target programs under user-mode QEMU when it is installed (apt-get install
# qemu-user), through scripts/run_aarch64.sh (an ARM /proc/cpuinfo for ONNX Runtime; see there)
find_program(CM_QEMU_AARCH64 NAMES qemu-aarch64 qemu-aarch64-static)
if(CM_QEMU_AARCH64)
  set(CMAKE_CROSSCOMPILING_EMULATOR "${CMAKE_CURRENT_LIST_DIR}/../../scripts/run_aarch64.sh")
endif()
