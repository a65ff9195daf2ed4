# What `cmake --install` puts beside the binaries, and the Debian package CPack makes of it
# (`cpack -G DEB` in a build configured with -DCMAKE_INSTALL_PREFIX=/usr; docs/packaging.md):
# the manual, bash completion, systemd units, the default configuration and the API documents.
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

# ---- systemd units and the configuration, with the paths this install uses -------------------
set(QB_SYSTEMD_UNIT_DIR /lib/systemd/system CACHE PATH "Where the systemd units are installed")
set(QB_CONFIG_DIR ${CMAKE_INSTALL_FULL_SYSCONFDIR}/qbroker)
file(READ ${CMAKE_SOURCE_DIR}/systemd/qbrokerd.service unit)
string(REPLACE "/usr/sbin/qbrokerd" "${CMAKE_INSTALL_FULL_SBINDIR}/qbrokerd" unit "${unit}")
string(REPLACE "/etc/qbroker/" "${QB_CONFIG_DIR}/" unit "${unit}")
file(GENERATE OUTPUT ${CMAKE_BINARY_DIR}/systemd/qbrokerd.service CONTENT "${unit}")
install(FILES ${CMAKE_BINARY_DIR}/systemd/qbrokerd.service
              ${CMAKE_SOURCE_DIR}/systemd/qbrokerd.socket
        DESTINATION ${QB_SYSTEMD_UNIT_DIR})
install(FILES ${CMAKE_SOURCE_DIR}/systemd/qbrokerd.json DESTINATION ${QB_CONFIG_DIR})
# The image root the default configuration names: qbrokerd refuses to start without it.
install(DIRECTORY DESTINATION /srv/qbroker)

# ---- The Debian package ------------------------------------------------------------------------
set(CPACK_PACKAGE_NAME qbroker)
set(CPACK_PACKAGE_VENDOR qbroker)
set(CPACK_PACKAGE_CONTACT "qbroker maintainers <qbroker@localhost>")
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY "QEMU broker: runs QEMU deprivileged, every resource passed as an fd")
string(CONCAT CPACK_PACKAGE_DESCRIPTION
       "qbrokerd runs each QEMU under a uid of its own, in its own namespaces with an empty root\n"
       "and seccomp, and opens every disk, CD, tap and listener itself, passing QEMU the open fd\n"
       "over QMP. It serves a JSON API on a Unix socket; qbrokerctl is its command line.")
set(CPACK_PACKAGING_INSTALL_PREFIX ${CMAKE_INSTALL_PREFIX})
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)  # qbroker_<version>_amd64.deb
set(CPACK_DEBIAN_PACKAGE_SECTION admin)
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
# groupadd (postinst) is in passwd, which is required but not essential.
set(CPACK_DEBIAN_PACKAGE_DEPENDS "qemu-system-x86, passwd")
set(CPACK_DEBIAN_PACKAGE_RECOMMENDS "systemd")
# The configuration is a conffile: dpkg keeps an edited one across upgrades.
file(WRITE ${CMAKE_BINARY_DIR}/deb/conffiles "${QB_CONFIG_DIR}/qbrokerd.json\n")
set(CPACK_DEBIAN_PACKAGE_CONTROL_EXTRA
    ${CMAKE_BINARY_DIR}/deb/conffiles ${CMAKE_SOURCE_DIR}/packaging/deb/postinst
    ${CMAKE_SOURCE_DIR}/packaging/deb/prerm ${CMAKE_SOURCE_DIR}/packaging/deb/postrm)
set(CPACK_DEBIAN_PACKAGE_CONTROL_STRICT_PERMISSION ON)
set(CPACK_GENERATOR DEB)
include(CPack)
