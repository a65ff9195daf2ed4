// ctl/ is qbrokerctl, a client of the HTTP API only.
//
// qbrokerctl's command line, parsed into the HTTP request it stands for. Pure: no I/O beyond
// reading a --from-json file, so tests check every subcommand's request directly.
//
// Every API route has a subcommand (command_table() lists them with their route; a test checks
// the table against the router's). Each subcommand is one row of flags, positional arguments and
// a builder; names go into the target percent-encoded (Boost.URL), one segment each. Errors name
// the argument or flag that is wrong.
#pragma once

#include <boost/json/value.hpp>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace qbctl {

// How a successful reply is shown to a person.
// `text`: the reply is not JSON and is printed as it came (metrics). `top`: a refreshing table.
enum class View { version, domains, domain, killed, vnc, qmp, message, events, text, top, xen, pool };

struct Invocation {
  std::string method;  // "GET", "POST", "PUT", "DELETE"
  std::string target;  // "/v1/domains/vm1?live=false"
  std::optional<boost::json::value> body;
  View view = View::message;
  std::string domain;        // the domain the command is about (progress events, messages)
  std::string progress_job;  // non-empty: a long job whose progress events are shown
  std::string done;          // what to print after success for View::message ("paused vm1")
  // events
  std::string events_domain;
  long events_count = -1;  // stop after this many events (top: refreshes); -1: until interrupted
  double interval_s = 2;   // top: seconds between refreshes
};

struct GlobalOptions {
  std::string socket = "/run/qbroker/qbroker.sock";
  bool json = false;
  bool progress = true;
  double timeout_s = 300;
  bool help = false;
  bool version = false;
};

struct CliError {
  std::string message;
  std::string field;  // the argument or flag at fault ("--memory", "NAME")
};

struct Parsed {
  GlobalOptions global;
  std::optional<Invocation> invocation;  // empty for help and --version
  std::vector<std::string> help_topic;   // "help disk" -> {"disk"}
};

// `args` without argv[0]. `env_socket` is $QBROKER_SOCKET (empty when unset).
std::variant<Parsed, CliError> parse(std::span<const std::string> args,
                                     std::string_view env_socket = {});

struct CommandInfo {
  std::string_view words;   // "cdrom insert"
  std::string_view args;    // "NAME CD PATH [--force]"
  std::string_view method;  // route method
  std::string_view route;   // route path template, as in the API
  std::string_view summary;
};
std::span<const CommandInfo> command_table();

// A flag and whether it takes a value ("--memory MIB": true).
struct FlagSpec {
  std::string_view name;
  bool value;
};

// How one subcommand is read, for completion: the words of command_table(), its flags and the
// names of its positional arguments ("NAME", "PATH").
struct SyntaxInfo {
  std::string_view words;
  std::span<const FlagSpec> flags;
  std::span<const std::string_view> positional;
  bool domain_alias = false;  // also answers as "domain WORDS"
};
std::vector<SyntaxInfo> syntax_table();

// The options every command takes, as --help lists them.
struct GlobalFlag {
  std::string_view name;  // "--socket"
  std::string_view arg;   // "PATH"; empty when it takes no value
  std::string_view help;
};
std::span<const GlobalFlag> global_flags();

std::string usage();                                                          // qbrokerctl --help
std::optional<std::string> command_help(std::span<const std::string> words);  // help WORDS...

// The target of GET /v1/events for one domain (every domain when `domain` is empty).
std::string events_target(std::string_view domain);

// The CLI flag a request field comes from, for error messages ("memory_mib" -> "--memory").
std::string flag_for_field(std::string_view field);

}  // namespace qbctl
