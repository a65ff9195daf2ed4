# Library layering, enforced in two ways:
#  1. Include paths: each layer sees only a staging directory that holds itself and the layers
#     beneath it (build/include/<layer>/<path> -> source dir), so `#include "qmp/wire.hpp"` from
#     fdpass, or "broker/flows/flows.hpp" from broker/domain, does not resolve.
#  2. A scan (scripts/check-layering.sh) that runs before anything compiles and fails the build on
#     any upward include, including relative ones such as "../broker/x.hpp" that path isolation
#     alone would let through.

set(QB_STAGE_ROOT ${CMAKE_BINARY_DIR}/include)

# qb_stage_layer(<layer>) -> sets QB_INCLUDE_<layer> (slashes become underscores:
# QB_INCLUDE_broker_flows) to a directory holding links to <layer> and every layer listed before
# it in QB_LAYERS, each at its own path: include/broker_flows/broker/domain -> broker/domain.
function(qb_stage_layer layer)
  string(REPLACE "/" "_" key ${layer})
  set(dir ${QB_STAGE_ROOT}/${key})
  file(MAKE_DIRECTORY ${dir})
  foreach(l IN LISTS QB_LAYERS)
    get_filename_component(parent ${dir}/${l} DIRECTORY)
    file(MAKE_DIRECTORY ${parent})
    file(CREATE_LINK ${CMAKE_SOURCE_DIR}/${l} ${dir}/${l} SYMBOLIC)
    if(l STREQUAL layer)
      break()
    endif()
  endforeach()
  set(QB_INCLUDE_${key} ${dir} PARENT_SCOPE)
endfunction()

foreach(l IN LISTS QB_LAYERS)
  qb_stage_layer(${l})
endforeach()

file(GLOB_RECURSE QB_LAYERED_SOURCES CONFIGURE_DEPENDS
     ${CMAKE_SOURCE_DIR}/fdpass/*.[ch]pp ${CMAKE_SOURCE_DIR}/qmp/*.[ch]pp
     ${CMAKE_SOURCE_DIR}/broker/*.[ch]pp)
add_custom_command(
  OUTPUT ${CMAKE_BINARY_DIR}/layering.stamp
  COMMAND ${CMAKE_SOURCE_DIR}/scripts/check-layering.sh ${CMAKE_SOURCE_DIR}
  COMMAND ${CMAKE_COMMAND} -E touch ${CMAKE_BINARY_DIR}/layering.stamp
  DEPENDS ${QB_LAYERED_SOURCES} ${CMAKE_SOURCE_DIR}/scripts/check-layering.sh
  COMMENT "Checking library layering"
  VERBATIM)
add_custom_target(layering DEPENDS ${CMAKE_BINARY_DIR}/layering.stamp)

# qb_library(<name> <layer> sources...) declares a library in a layer ("qmp", "broker/flows").
function(qb_library name layer)
  string(REPLACE "/" "_" key ${layer})
  add_library(${name} ${ARGN})
  target_include_directories(${name} PUBLIC $<BUILD_INTERFACE:${QB_INCLUDE_${key}}>)
  add_dependencies(${name} layering)
endfunction()
