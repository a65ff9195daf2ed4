# What `cmake --install` puts beside the binaries: the manual, bash completion and the API
# documents.
include(GNUInstallDirs)

# ---- The manual: each page is its template with sections from the binary's own tables --------
set(QB_MAN_DIR ${CMAKE_BINARY_DIR}/man)
set(QB_MAN_PAGES)
function(qb_manpage page section generator flag)
  set(template ${CMAKE_SOURCE_DIR}/docs/man/${page}.in)
  add_custom_command(
    OUTPUT ${QB_MAN_DIR}/${page} ${QB_MAN_DIR}/${page}.gz
    COMMAND ${CMAKE_COMMAND} -DGEN=$<TARGET_FILE:${generator}> -DFLAG=${flag}
            -DTEMPLATE=${template} -DOUT=${QB_MAN_DIR}/${page} -DVERSION=${PROJECT_VERSION}
            -P ${CMAKE_SOURCE_DIR}/cmake/manpage.cmake
    COMMAND gzip -9nf -k ${QB_MAN_DIR}/${page}
    DEPENDS ${generator} ${template} ${CMAKE_SOURCE_DIR}/cmake/manpage.cmake
    COMMENT "Writing the manual page ${page}")
  install(FILES ${QB_MAN_DIR}/${page}.gz DESTINATION ${CMAKE_INSTALL_MANDIR}/man${section})
  set(QB_MAN_PAGES ${QB_MAN_PAGES} ${QB_MAN_DIR}/${page} PARENT_SCOPE)
endfunction()
file(MAKE_DIRECTORY ${QB_MAN_DIR})
qb_manpage(qbrokerd.8 8 qbrokerd --help-man)
qb_manpage(qbrokerd.json.5 5 qbrokerd --help-man)
qb_manpage(qbrokerctl.1 1 qbrokerctl __man)
add_custom_target(qb_man ALL DEPENDS ${QB_MAN_PAGES})

install(FILES ${CMAKE_SOURCE_DIR}/ctl/qbrokerctl.bash
        DESTINATION ${CMAKE_INSTALL_DATADIR}/bash-completion/completions RENAME qbrokerctl)
install(FILES ${CMAKE_SOURCE_DIR}/docs/api.yaml ${CMAKE_SOURCE_DIR}/docs/api.md
        DESTINATION ${CMAKE_INSTALL_DOCDIR})
