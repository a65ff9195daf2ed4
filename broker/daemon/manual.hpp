// The option sections of qbrokerd(8) and qbrokerd.json(5), in roff, rendered from the option
// table that also gives --help and the config keys (options.cpp), so the manual cannot drift
// from them. The build asks for them with the hidden flag --help-man and puts them into the
// pages' templates (docs/man/, cmake/manpage.cmake).
#pragma once

#include <optional>
#include <string>
#include <string_view>

namespace broker::daemon {

// "options": the OPTIONS of qbrokerd(8); "config": the KEYS of qbrokerd.json(5).
std::optional<std::string> man_section(std::string_view which);

}  // namespace broker::daemon
