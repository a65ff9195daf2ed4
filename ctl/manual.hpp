// The OPTIONS and COMMANDS of qbrokerctl(1), in roff, rendered from the tables that give --help
// and `help COMMAND` (cli.cpp), so the manual cannot drift from them. The build asks for them
// with the hidden command `qbrokerctl __man` and puts them into the page's template (docs/man/).
#pragma once

#include <optional>
#include <string>
#include <string_view>

namespace qbctl {

// "options" or "commands".
std::optional<std::string> man_section(std::string_view which);

}  // namespace qbctl
