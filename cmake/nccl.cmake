# cmake/nccl.cmake: finds NCCL (nccl.h and libnccl) for the GPU expert-parallel path
# (src/dist/nccl_group.cpp). Sets AUTOMOE_HAVE_NCCL, NCCL_INCLUDE_DIR, NCCL_LIBRARY and the
# imported target automoe::nccl (linked by full path with its folder on the RPATH: pip's
# nvidia-nccl wheel, which torch ships, has libnccl.so.2 and no plain libnccl.so). Without NCCL
# everything else builds; the EP code then has the loopback transport only.
#
# First found wins:
#   -DNCCL_ROOT=... or env NCCL_ROOT (include/nccl.h, lib/ or lib64/)
#   the CUDA toolkit's include/ and lib/ (this CI machine: /usr/local/cuda-13.0)
#   system paths (/usr/include, /usr/local/include; the GPU machine has the header there)
#   Python's site-packages/nvidia/nccl (pip nvidia-nccl-cu13, or torch's: the GPU machine's lib)
# The header and the library may come from different places (the GPU machine: /usr/include and
# torch's wheel); the versions are printed here and checked at run time (ep_check prints both).
option(AUTOMOE_NCCL "Build the NCCL transport when NCCL is found" ON)
set(AUTOMOE_HAVE_NCCL OFF)
if(NOT AUTOMOE_NCCL)
  message(STATUS "NCCL: off (AUTOMOE_NCCL=OFF): GPU expert parallelism has the loopback transport only")
  return()
endif()

set(_nccl_site "")
find_program(AUTOMOE_PYTHON NAMES python3 python)
if(AUTOMOE_PYTHON)
  execute_process(COMMAND ${AUTOMOE_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/site_packages.py
    OUTPUT_VARIABLE _out OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE _rc)
  if(_rc EQUAL 0 AND _out)
    string(REPLACE "\n" ";" _sites "${_out}")
    foreach(d ${_sites})
      list(APPEND _nccl_site "${d}/nvidia/nccl")
    endforeach()
  endif()
endif()
set(_nccl_roots "")
foreach(r "${NCCL_ROOT}" "$ENV{NCCL_ROOT}")
  if(r)
    list(APPEND _nccl_roots "${r}")
  endif()
endforeach()

set(_inc_hints "")
set(_lib_hints "")
foreach(r ${_nccl_roots})
  list(APPEND _inc_hints "${r}/include")
  list(APPEND _lib_hints "${r}/lib" "${r}/lib64")
endforeach()
list(APPEND _inc_hints ${CUDAToolkit_INCLUDE_DIRS})
list(APPEND _lib_hints ${CUDAToolkit_LIBRARY_DIR} "${CUDAToolkit_LIBRARY_ROOT}/lib")
set(_site_inc "")
set(_site_lib "")
foreach(r ${_nccl_site})
  list(APPEND _site_inc "${r}/include")
  list(APPEND _site_lib "${r}/lib")
endforeach()

find_path(NCCL_INCLUDE_DIR nccl.h HINTS ${_inc_hints} PATHS ${_site_inc})
find_library(NCCL_LIBRARY NAMES nccl libnccl.so.2 NAMES_PER_DIR HINTS ${_lib_hints}
  PATHS ${_site_lib})

if(NOT NCCL_INCLUDE_DIR OR NOT NCCL_LIBRARY)
  message(STATUS "NCCL: not found (header: ${NCCL_INCLUDE_DIR}, library: ${NCCL_LIBRARY}); "
    "building without the NCCL transport (AUTOMOE_HAVE_NCCL=0): ep_check runs in loopback mode "
    "only. Install NCCL (libnccl-dev, or pip nvidia-nccl-cu13) or pass -DNCCL_ROOT=...")
  return()
endif()

file(STRINGS "${NCCL_INCLUDE_DIR}/nccl.h" _v REGEX "define NCCL_(MAJOR|MINOR|PATCH) ")
string(REGEX REPLACE ".*NCCL_MAJOR ([0-9]+).*" "\\1" _maj "${_v}")
string(REGEX REPLACE ".*NCCL_MINOR ([0-9]+).*" "\\1" _min "${_v}")
string(REGEX REPLACE ".*NCCL_PATCH ([0-9]+).*" "\\1" _pat "${_v}")
set(NCCL_VERSION_STRING "${_maj}.${_min}.${_pat}")
if(NCCL_VERSION_STRING VERSION_LESS 2.19)
  message(STATUS "NCCL: ${NCCL_VERSION_STRING} at ${NCCL_INCLUDE_DIR} is older than 2.19 (no "
    "non-blocking communicators with ncclCommGetAsyncError polling): not used")
  return()
endif()

get_filename_component(_libdir "${NCCL_LIBRARY}" DIRECTORY)
add_library(automoe::nccl SHARED IMPORTED)
set_target_properties(automoe::nccl PROPERTIES
  IMPORTED_LOCATION "${NCCL_LIBRARY}"
  INTERFACE_INCLUDE_DIRECTORIES "${NCCL_INCLUDE_DIR}"
  INTERFACE_LINK_OPTIONS "LINKER:-rpath,${_libdir}")
set(AUTOMOE_HAVE_NCCL ON)
message(STATUS "NCCL: ${NCCL_VERSION_STRING} (header ${NCCL_INCLUDE_DIR}, library ${NCCL_LIBRARY})")
