#include "ctl/manual.hpp"

#include "ctl/cli.hpp"

namespace qbctl {
namespace {

// Text as roff prints it: a backslash is an escape and "-" a hyphen ("\-" is the minus that
// options are spelled with), and a line starting with "." or "'" would be a request. (qbrokerd's
// manual.cpp has the same few lines: the CLI shares no code with the broker.)
std::string roff(std::string_view text) {
  std::string out;
  if (!text.empty() && (text.front() == '.' || text.front() == '\'')) out = "\\&";
  for (char c : text) {
    if (c == '\\') {
      out += "\\e";
    } else if (c == '-') {
      out += "\\-";
    } else {
      out += c;
    }
  }
  return out;
}

// The table's argument synopsis is laid out for an 80-column --help; roff fills lines itself.
std::string one_line(std::string_view args) {
  std::string out;
  bool space = false;
  for (char c : args) {
    if (c == '\n' || c == ' ') {
      space = !out.empty();
      continue;
    }
    if (space) out += ' ';
    space = false;
    out += c;
  }
  return out;
}

std::string options_section() {
  std::string out;
  for (const auto& f : global_flags()) {
    out += ".TP\n.B " + roff(f.name);
    if (!f.arg.empty()) out += " \\fI" + roff(f.arg) + "\\fR";
    out += "\n" + roff(f.help) + "\n";
  }
  return out;
}

std::string commands_section() {
  std::string out;
  for (const auto& c : command_table()) {
    out += ".TP\n.B " + roff(c.words);
    if (!c.args.empty()) out += " \\fR" + roff(one_line(c.args));
    out += "\n" + roff(c.summary) + ".\n.br\nAPI: " + roff(c.method) + " " + roff(c.route) + "\n";
  }
  return out;
}

}  // namespace

std::optional<std::string> man_section(std::string_view which) {
  if (which == "options") return options_section();
  if (which == "commands") return commands_section();
  return std::nullopt;
}

}  // namespace qbctl
