# tests/cuda_host.cmake: tests of the CUDA backend's host code (tests/cuda_host), built where
# nvcc is found and run without a GPU.
if(AUTOMOE_HAVE_CUDA AND TARGET automoe_cuda)
  add_executable(test_cuda_host ${CMAKE_SOURCE_DIR}/tests/cuda_host/test_cuda_host.cpp)
  target_compile_options(test_cuda_host PRIVATE ${AUTOMOE_WARN} -O2)
  target_link_libraries(test_cuda_host PRIVATE automoe_cuda GTest::gtest GTest::gtest_main)
  gtest_discover_tests(test_cuda_host DISCOVERY_TIMEOUT 60 PROPERTIES LABELS cuda_host)
endif()
