# tests/fuzz.cmake: the libFuzzer targets (tests/fuzz/) as bounded ctest runs: each builds with
# clang + ASan/UBSan through tests/fuzz/run_fuzz.sh and fuzzes for AUTOMOE_FUZZ_SECONDS (20) from
# its seeds; a crash, sanitizer report, leak or timeout fails the test and leaves the input in
# build/fuzz/<target>/crashes/. Registered only where clang++ has libFuzzer (scripts/setup.sh
# installs it on Debian). The targets share one object build, so they run in order.
find_program(FUZZ_CLANGXX NAMES clang++ clang++-14)
set(AUTOMOE_FUZZ_SECONDS 20 CACHE STRING "seconds each fuzz test runs")
if(FUZZ_CLANGXX)
  execute_process(COMMAND ${FUZZ_CLANGXX} -print-file-name=libclang_rt.fuzzer-x86_64.a
                  OUTPUT_VARIABLE FUZZ_RT OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
endif()
if(FUZZ_CLANGXX AND FUZZ_RT AND EXISTS "${FUZZ_RT}")
  set(prev "")
  foreach(t jinja tokenizer_load encode jsonl)
    add_test(NAME fuzz_${t} COMMAND bash ${CMAKE_SOURCE_DIR}/tests/fuzz/run_fuzz.sh ${t}
             ${AUTOMOE_FUZZ_SECONDS})
    set_tests_properties(fuzz_${t} PROPERTIES LABELS fuzz TIMEOUT 1200
      ENVIRONMENT "CXX=${FUZZ_CLANGXX};FUZZ_OUT=${CMAKE_BINARY_DIR}/fuzz")
    if(prev)
      set_tests_properties(fuzz_${t} PROPERTIES DEPENDS ${prev})
    endif()
    set(prev fuzz_${t})
  endforeach()
  # encode and jsonl read the real tokenizers; without ../shared/data they skip.
  foreach(t encode jsonl)
    set_tests_properties(fuzz_${t} PROPERTIES SKIP_RETURN_CODE 77)
  endforeach()
else()
  message(STATUS "clang++ with libFuzzer not found: the fuzz tests (tests/fuzz.cmake) are not "
                 "registered. On Debian: apt-get install clang libclang-rt-14-dev")
endif()
