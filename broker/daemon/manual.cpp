#include "broker/daemon/manual.hpp"

#include "broker/daemon/options.hpp"

namespace broker::daemon {
namespace {

// Text as roff prints it: a backslash is an escape and "-" a hyphen ("\-" is the minus that
// options are spelled with), and a line starting with "." or "'" would be a request.
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

std::string options_section() {
  std::string out;
  for (const auto& o : option_docs()) {
    out += ".TP\n.B \\-\\-" + roff(o.name);
    if (!o.arg.empty()) out += " \\fI" + roff(o.arg) + "\\fR";
    out += "\n" + roff(o.help) + "\n";
  }
  return out;
}

// What a config file's value for the option is: JSON the flag's text converts from.
std::string json_type(const OptionDoc& o) {
  if (o.flag) return "true or false";
  const std::string arg(o.arg);
  bool numeric = arg == "N" || arg == "MS" || arg == "BYTES";
  if (o.list) return "an array of strings, or one string (" + arg + ")";
  return numeric ? "a number (" + arg + ")" : "a string (" + arg + ")";
}

std::string config_section() {
  std::string out;
  for (const auto& o : option_docs()) {
    out += ".TP\n.B " + roff(o.name) + "\n" + roff(json_type(o)) + ": " + roff(o.help) + "\n";
  }
  return out;
}

}  // namespace

std::optional<std::string> man_section(std::string_view which) {
  if (which == "options") return options_section();
  if (which == "config") return config_section();
  return std::nullopt;
}

}  // namespace broker::daemon
