# tests/dist.cmake: the expert-parallel, ZeRO and collective tests (tests/dist/test_dist.cpp,
# test_zero.cpp, test_zero3.cpp, test_comm.cpp, test_ep_balance.cpp) on 2, 4 and 8 ranks under mpirun, and on the TCP backend under
# torchrun's variables (tools/launch_local.sh: 4 ranks, and the collectives alone on 3). ctest's
# per-test entries of test_dist (world size 1) check the CLI under mpirun and over TCP.
# CI runs as root on 2 cores: --allow-run-as-root, --oversubscribe, and idle ranks yield the
# CPU. RUN_SERIAL: oversubscribed ranks must not also share the cores with other tests.
if(TARGET test_dist)
  # TCP: the collectives on 3 ranks (odd splits), and every multi-rank test on 4 (4 s)
  set(DIST_LOCAL bash ${CMAKE_SOURCE_DIR}/tools/launch_local.sh)
  add_test(NAME dist_tcp_np3 COMMAND ${DIST_LOCAL} 3 $<TARGET_FILE:test_dist> --gtest_filter=Comm.*
    WORKING_DIRECTORY ${CMAKE_BINARY_DIR})
  add_test(NAME dist_tcp_np4 COMMAND ${DIST_LOCAL} 4 $<TARGET_FILE:test_dist>
    WORKING_DIRECTORY ${CMAKE_BINARY_DIR})
  set_tests_properties(dist_tcp_np3 dist_tcp_np4 PROPERTIES LABELS dist
    ENVIRONMENT "AUTOMOE_THREADS=1;AUTOMOE_EXPECT_BACKEND=tcp" TIMEOUT 300 RUN_SERIAL TRUE)
  find_program(MPIRUN NAMES mpirun mpiexec)
  if(MPIRUN)
    set(DIST_MPIRUN ${MPIRUN} --oversubscribe --allow-run-as-root --tag-output)
    set(DIST_ENV OMPI_MCA_mpi_yield_when_idle=1 OMPI_MCA_rmaps_base_oversubscribe=1 AUTOMOE_THREADS=1
      AUTOMOE_EXPECT_BACKEND=mpi)
    add_test(NAME dist_mpirun_np2 COMMAND ${DIST_MPIRUN} -np 2 $<TARGET_FILE:test_dist>
      WORKING_DIRECTORY ${CMAKE_BINARY_DIR})
    add_test(NAME dist_mpirun_np4 COMMAND ${DIST_MPIRUN} -np 4 $<TARGET_FILE:test_dist>
      WORKING_DIRECTORY ${CMAKE_BINARY_DIR})
    # issue 5: the EP = 8 layout (one expert of tiny-moe per rank) for a few steps
    add_test(NAME dist_mpirun_np8_ep8 COMMAND ${DIST_MPIRUN} -np 8 $<TARGET_FILE:test_dist>
      --gtest_filter=Ep8.*:EpDispatch.*
      WORKING_DIRECTORY ${CMAKE_BINARY_DIR})
    set_tests_properties(dist_mpirun_np2 dist_mpirun_np4 dist_mpirun_np8_ep8 PROPERTIES
      LABELS dist ENVIRONMENT "${DIST_ENV}" TIMEOUT 900 RUN_SERIAL TRUE)
  else()
    message(STATUS "mpirun not found: the multi-rank tests (tests/dist.cmake) are not registered")
  endif()
endif()
