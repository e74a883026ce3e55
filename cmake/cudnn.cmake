# cmake/cudnn.cmake: finds cuDNN (cudnn.h, libcudnn.so.9) and the cudnn-frontend headers for the
# attention op's cuDNN SDPA path (src/backend/cuda/attention_cudnn.cpp). Sets AUTOMOE_HAVE_CUDNN,
# CUDNN_INCLUDE_DIR, CUDNN_LIBRARY, CUDNN_FRONTEND_INCLUDE_DIR and the imported target
# automoe::cudnn (linked by full path, its folder on the RPATH: pip's wheel has libcudnn.so.9 and
# no plain libcudnn.so). Without them the CUDA backend builds with the fallback attention only.
#
# First found wins:
#   cudnn-frontend: -DCUDNN_FRONTEND_INCLUDE_DIR=... or env CUDNN_FRONTEND_INCLUDE_DIR; Python's
#     site-packages/include (pip install --no-deps nvidia-cudnn-frontend, scripts/setup.sh); a
#     wheel nvidia_cudnn_frontend-*.whl in the source tree's .whl/ (unpacked into the build
#     folder: how the headers reach the GPU machine, which cannot pip-install from the net).
#   cuDNN: -DCUDNN_ROOT=... or env CUDNN_ROOT; Python's site-packages/nvidia/cudnn (pip
#     nvidia-cudnn-cu13, or torch's); the CUDA toolkit's include/ and lib64/.
option(AUTOMOE_CUDNN "Use cuDNN SDPA (flash attention) when cuDNN and cudnn-frontend are found" ON)
set(AUTOMOE_HAVE_CUDNN OFF)
if(NOT AUTOMOE_CUDNN)
  message(STATUS "cuDNN: off (AUTOMOE_CUDNN=OFF): attention uses the fallback kernel")
  return()
endif()

set(_site_dirs "")
find_program(AUTOMOE_PYTHON NAMES python3 python)
if(AUTOMOE_PYTHON)
  execute_process(COMMAND ${AUTOMOE_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/site_packages.py
    OUTPUT_VARIABLE _out OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE _rc)
  if(_rc EQUAL 0 AND _out)
    string(REPLACE "\n" ";" _site_dirs "${_out}")
  endif()
endif()

# --- cudnn-frontend (header-only) ------------------------------------------------------------
set(_fe_hints "")
if(DEFINED ENV{CUDNN_FRONTEND_INCLUDE_DIR})
  list(APPEND _fe_hints "$ENV{CUDNN_FRONTEND_INCLUDE_DIR}")
endif()
foreach(d ${_site_dirs})
  list(APPEND _fe_hints "${d}/include")
endforeach()
find_path(CUDNN_FRONTEND_INCLUDE_DIR cudnn_frontend.h HINTS ${_fe_hints})
if(NOT CUDNN_FRONTEND_INCLUDE_DIR)
  file(GLOB _fe_whl "${CMAKE_SOURCE_DIR}/.whl/nvidia_cudnn_frontend-*.whl")
  if(_fe_whl)
    list(GET _fe_whl 0 _fe_whl)
    set(_fe_dir "${CMAKE_BINARY_DIR}/_deps/cudnn_frontend")
    file(ARCHIVE_EXTRACT INPUT "${_fe_whl}" DESTINATION "${_fe_dir}" PATTERNS "include/*")
    if(EXISTS "${_fe_dir}/include/cudnn_frontend.h")
      set(CUDNN_FRONTEND_INCLUDE_DIR "${_fe_dir}/include" CACHE PATH "cudnn-frontend headers" FORCE)
      message(STATUS "cuDNN: cudnn-frontend headers unpacked from ${_fe_whl}")
    endif()
  endif()
endif()

# --- cuDNN --------------------------------------------------------------------------------------
set(_cudnn_hints "")
foreach(r "${CUDNN_ROOT}" "$ENV{CUDNN_ROOT}")
  if(r)
    list(APPEND _cudnn_hints "${r}")
  endif()
endforeach()
foreach(d ${_site_dirs})
  list(APPEND _cudnn_hints "${d}/nvidia/cudnn")
endforeach()
set(_inc_hints "")
foreach(r ${_cudnn_hints})
  list(APPEND _inc_hints "${r}/include")
endforeach()
find_path(CUDNN_INCLUDE_DIR cudnn_version.h HINTS ${_inc_hints} ${CUDAToolkit_INCLUDE_DIRS})
if(CUDNN_INCLUDE_DIR)
  # the library beside the headers that were found (never headers of one install, lib of another)
  get_filename_component(_root "${CUDNN_INCLUDE_DIR}" DIRECTORY)
  find_library(CUDNN_LIBRARY NAMES cudnn libcudnn.so.9 NAMES_PER_DIR
    HINTS "${_root}/lib" "${_root}/lib64" ${CUDAToolkit_LIBRARY_DIR} NO_DEFAULT_PATH)
endif()

set(_why "")
if(NOT CUDNN_FRONTEND_INCLUDE_DIR)
  set(_why "no cudnn-frontend headers (pip install --no-deps nvidia-cudnn-frontend==1.32.0, as "
    "scripts/setup.sh does; or put its wheel in .whl/; or -DCUDNN_FRONTEND_INCLUDE_DIR=...)")
elseif(NOT CUDNN_INCLUDE_DIR OR NOT CUDNN_LIBRARY)
  set(_why "no cuDNN headers and library (pip install nvidia-cudnn-cu13, or -DCUDNN_ROOT=...)")
else()
  file(STRINGS "${CUDNN_INCLUDE_DIR}/cudnn_version.h" _v
    REGEX "define CUDNN_(MAJOR|MINOR|PATCHLEVEL) ")
  string(REGEX REPLACE ".*CUDNN_MAJOR ([0-9]+).*" "\\1" _maj "${_v}")
  string(REGEX REPLACE ".*CUDNN_MINOR ([0-9]+).*" "\\1" _min "${_v}")
  string(REGEX REPLACE ".*CUDNN_PATCHLEVEL ([0-9]+).*" "\\1" _pat "${_v}")
  set(CUDNN_VERSION_STRING "${_maj}.${_min}.${_pat}")
  file(STRINGS "${CUDNN_FRONTEND_INCLUDE_DIR}/cudnn_frontend_version.h" _fv
    REGEX "define CUDNN_FRONTEND_(MAJOR|MINOR|PATCH)_VERSION ")
  string(REGEX REPLACE ".*MAJOR_VERSION ([0-9]+).*" "\\1" _fmaj "${_fv}")
  string(REGEX REPLACE ".*MINOR_VERSION ([0-9]+).*" "\\1" _fmin "${_fv}")
  string(REGEX REPLACE ".*PATCH_VERSION ([0-9]+).*" "\\1" _fpat "${_fv}")
  set(CUDNN_FRONTEND_VERSION_STRING "${_fmaj}.${_fmin}.${_fpat}")
  if(_maj LESS 9)
    set(_why "cuDNN ${CUDNN_VERSION_STRING} at ${CUDNN_INCLUDE_DIR} is older than 9.0")
  elseif(CUDNN_FRONTEND_VERSION_STRING VERSION_LESS 1.32.0)
    set(_why "cudnn-frontend ${CUDNN_FRONTEND_VERSION_STRING} at ${CUDNN_FRONTEND_INCLUDE_DIR} is "
      "older than 1.32.0 (pip install --no-deps nvidia-cudnn-frontend==1.32.0)")
  endif()
endif()

if(NOT _why AND NOT TARGET CUDA::nvrtc)
  set(_why "the CUDA toolkit has no NVRTC (libnvrtc), which cudnn-frontend links")
endif()
if(_why)
  string(CONCAT _why ${_why})
  message(STATUS "cuDNN: not used: ${_why}. The CUDA backend builds without it "
    "(AUTOMOE_HAVE_CUDNN=0): attention runs the fallback kernel.")
  return()
endif()

get_filename_component(_libdir "${CUDNN_LIBRARY}" DIRECTORY)
add_library(automoe::cudnn SHARED IMPORTED)
set_target_properties(automoe::cudnn PROPERTIES
  IMPORTED_LOCATION "${CUDNN_LIBRARY}"
  INTERFACE_INCLUDE_DIRECTORIES "${CUDNN_INCLUDE_DIR}"
  INTERFACE_LINK_OPTIONS "LINKER:-rpath,${_libdir}"
  # cudnn-frontend's own engines (sm100 RMSNorm+SiLU) compile through NVRTC; the symbols are
  # referenced whether or not those engines run.
  INTERFACE_LINK_LIBRARIES CUDA::nvrtc)
set(AUTOMOE_HAVE_CUDNN ON)
message(STATUS "cuDNN: ${CUDNN_VERSION_STRING} (${CUDNN_LIBRARY}), cudnn-frontend "
  "${CUDNN_FRONTEND_VERSION_STRING} (${CUDNN_FRONTEND_INCLUDE_DIR}): attention uses cuDNN SDPA")
