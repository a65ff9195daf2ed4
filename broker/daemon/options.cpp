#include "broker/daemon/options.hpp"

#include <algorithm>
#include <boost/json.hpp>
#include <boost/program_options/options_description.hpp>
#include <boost/program_options/parsers.hpp>
#include <charconv>
#include <functional>
#include <map>
#include <optional>
#include <type_traits>

#include "broker/core/atomic_file.hpp"
#include "broker/core/errc.hpp"

namespace broker::daemon {
namespace json = boost::json;
namespace po = boost::program_options;
namespace {

// One option's values, as text, and where they came from. Flags and config files go through
// the same conversion, so a value means the same wherever it is written.
struct Setting {
  std::vector<std::string> values;  // more than one only for a list
  std::string field;                // "--state-dir" for a flag, "state-dir" for a config key
  std::string file;                 // the config file; empty for a flag
};

using Settings = std::map<std::string, Setting, std::less<>>;  // by option name

// A setter stores one text value into the config, or says what is wrong with it.
using Complaint = std::optional<std::string>;
using Setter = std::function<Complaint(DaemonConfig&, std::string_view)>;

enum class Kind { value, list, flag };

struct Option {
  std::string_view name;  // flag without "--", and the config file key
  Kind kind;
  std::string_view arg;  // the value's name in --help
  std::string help;
  Setter set;
};

Error invalid(const std::string& field, const std::string& message) {
  Error e(make_error_code(errc::invalid_argument), field + ": " + message);
  e.field = field;
  return e;
}

Error invalid(const Setting& s, const std::string& message) {
  Error e = invalid(s.field, message);
  if (!s.file.empty()) e.message = s.file + ": " + e.message;
  return e;
}

// ---- Setters: one per kind of value ------------------------------------------------------------

template <class T>
auto member(T DaemonConfig::*m) {
  return [m](DaemonConfig& c) -> T& { return c.*m; };
}

template <class T>
auto limit(T api::ServerLimits::*m) {
  return [m](DaemonConfig& c) -> T& { return c.limits.*m; };
}

std::optional<unsigned long long> number(std::string_view v, unsigned long long min,
                                         unsigned long long max) {
  unsigned long long n = 0;
  auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
  if (ec != std::errc() || p != v.data() + v.size() || n < min || n > max) return std::nullopt;
  return n;
}

template <class Place>
Setter path(Place place) {
  return [place](DaemonConfig& c, std::string_view v) -> Complaint {
    if (v.empty() || v.front() != '/') return "must be an absolute path";
    place(c) = std::string(v);
    return std::nullopt;
  };
}

template <class Place>
Setter word(Place place) {
  return [place](DaemonConfig& c, std::string_view v) -> Complaint {
    if (v.empty()) return "must not be empty";
    place(c) = std::string(v);
    return std::nullopt;
  };
}

template <class Place>
Setter count(Place place, unsigned long long min, unsigned long long max) {
  return [place, min, max](DaemonConfig& c, std::string_view v) -> Complaint {
    auto n = number(v, min, max);
    if (!n) return "must be a number from " + std::to_string(min) + " to " + std::to_string(max);
    place(c) = static_cast<std::remove_reference_t<decltype(place(c))>>(*n);
    return std::nullopt;
  };
}

template <class Place>
Setter millis(Place place) {
  return [place](DaemonConfig& c, std::string_view v) -> Complaint {
    constexpr unsigned long long kDay = 24ull * 3600 * 1000;
    auto n = number(v, 1, kDay);
    if (!n) return "must be a number from 1 to " + std::to_string(kDay);
    place(c) = std::chrono::milliseconds(*n);
    return std::nullopt;
  };
}

Complaint set_uid_range(DaemonConfig& c, std::string_view v) {
  auto range = lifecycle::UidRange::parse(v);
  if (!range) return "must be BASE:COUNT";
  c.uids = *range;
  return std::nullopt;
}

Complaint set_uid_range_user(DaemonConfig& c, std::string_view v) {
  if (v.empty()) return "must not be empty";
  c.uids = UidRangeUser{std::string(v)};
  return std::nullopt;
}

Complaint add_image_root(DaemonConfig& c, std::string_view v) {
  if (v.empty() || v.front() != '/') return "must be an absolute path";
  c.image_roots.emplace_back(v);
  return std::nullopt;
}

Complaint add_pool_shape(DaemonConfig& c, std::string_view v) {
  auto shape = parse_pool_shape(v);
  if (!shape) {
    std::string why = shape.error().message;
    if (why.starts_with("pool: ")) why.erase(0, 6);
    return why;
  }
  for (const auto& other : c.pool) {
    PoolShape same = *shape;
    same.count = other.count;
    if (same == other) return "names the shape of an earlier --pool again; give one count";
  }
  c.pool.push_back(*shape);
  return std::nullopt;
}

Complaint add_qemu_data_dir(DaemonConfig& c, std::string_view v) {
  if (v.empty() || v.front() != '/') return "must be an absolute path";
  c.qemu_data_dirs.emplace_back(v);
  return std::nullopt;
}

Complaint add_image_owner(DaemonConfig& c, std::string_view v) {
  if (v.empty()) return "must be a user name or a uid";
  c.image_owners.emplace_back(v);
  return std::nullopt;
}

Complaint set_migration_listen(DaemonConfig& c, std::string_view v) {
  auto at = parse_listen_address(v);
  if (!at) return at.error().message;
  c.migration_listen = std::string(v);
  return std::nullopt;
}

// A member of DaemonConfig::migration, for path() and boolean().
template <class T>
auto member_of_migration(T MigrationTransport::*m) {
  return [m](DaemonConfig& c) -> T& { return c.migration.*m; };
}

template <class Place>
Setter boolean(Place place) {
  return [place](DaemonConfig& c, std::string_view v) -> Complaint {
    if (v != "true" && v != "false") return "must be true or false";
    place(c) = v == "true";
    return std::nullopt;
  };
}

Complaint set_log_level(DaemonConfig& c, std::string_view v) {
  static const std::map<std::string_view, log::Level> kLevels{{"debug", log::Level::debug},
                                                              {"info", log::Level::info},
                                                              {"warn", log::Level::warn},
                                                              {"error", log::Level::error}};
  auto it = kLevels.find(v);
  if (it == kLevels.end()) return "must be debug, info, warn or error";
  c.log_level = it->second;
  return std::nullopt;
}

Complaint set_log_format(DaemonConfig& c, std::string_view v) {
  static const std::map<std::string_view, log::Format> kFormats{
      {"text", log::Format::text}, {"json", log::Format::json}, {"journal", log::Format::journal}};
  auto it = kFormats.find(v);
  if (it == kFormats.end()) return "must be text, json or journal";
  c.log_format = it->second;
  return std::nullopt;
}

// Every option, in the order --help lists them and validation applies them.
const std::vector<Option>& options() {
  using L = api::ServerLimits;
  static const std::vector<Option> kOptions = {
      {"socket", Kind::value, "PATH", "the API socket (default /run/qbroker/qbroker.sock)",
       path(member(&DaemonConfig::socket))},
      {"state-dir", Kind::value, "DIR", "uid records (default /var/lib/qbroker)",
       path(member(&DaemonConfig::state_dir))},
      {"run-dir", Kind::value, "DIR",
       "domain records, QMP/console sockets, logs, jails (default /run/qbroker)",
       path(member(&DaemonConfig::run_dir))},
      {"uid-range", Kind::value, "BASE:COUNT",
       "QEMU uids base+1..base+count-1; base is the reaper uid (default " +
           std::string(kDefaultUidRange) + ")",
       set_uid_range},
      {"uid-range-user", Kind::value, "NAME", "libxl style: the named user's uid is the base",
       set_uid_range_user},
      {"uid-count", Kind::value, "N", "uids in the range with --uid-range-user (default 4096)",
       count(member(&DaemonConfig::uid_count), 2, 1u << 24)},
      {"image-root", Kind::list, "DIR", "a directory user paths may name (repeatable)",
       add_image_root},
      {"image-owner", Kind::list, "USER",
       "a user (name or uid) whose files may be opened read-write beneath an image root "
       "(repeatable; default root and the members of --admin-group)",
       add_image_owner},
      {"allow-hardlinks", Kind::flag, "",
       "accept files with more than one hard link beneath an image root",
       boolean(member(&DaemonConfig::allow_hardlinks))},
      {"save-root", Kind::value, "DIR",
       "save files are written beneath it and restored from it (default: none, save is off)",
       path(member(&DaemonConfig::save_root))},
      {"qemu", Kind::value, "PATH", "the QEMU binary (default /usr/bin/qemu-system-x86_64)",
       path(member(&DaemonConfig::qemu))},
      {"qemu-datadir", Kind::list, "DIR",
       "a directory QEMU reads firmware and option ROMs from, ahead of its built-in ones "
       "(repeatable; for a QEMU installed outside /usr)",
       add_qemu_data_dir},
      {"admin-group", Kind::value, "NAME",
       "members of this group may use the API (root always may)",
       word(member(&DaemonConfig::admin_group))},
      {"xen", Kind::flag, "",
       "Xen dom0 mode: device models under libxl's per-domid uids, killed by uid when their "
       "domain is released (docs/xen.md)",
       boolean(member(&DaemonConfig::xen))},
      {"xen-shared-uid", Kind::flag, "",
       "with --xen: accept xen-qemuuser-shared when xen-qemuuser-range-base does not exist "
       "(no kill by uid is then possible)",
       boolean(member(&DaemonConfig::xen_shared_uid))},
      {"xen-dev", Kind::value, "DIR", "with --xen: Xen's device nodes (default /dev/xen)",
       path(member(&DaemonConfig::xen_dev))},
      {"xen-reaper-lock", Kind::value, "PATH",
       "with --xen: the lock libxl's reapers take (default /var/run/xen/dm-reaper-lock)",
       path(member(&DaemonConfig::xen_reaper_lock))},
      {"log-level", Kind::value, "LEVEL", "debug, info, warn or error (default info)",
       set_log_level},
      {"log-format", Kind::value, "FORMAT",
       "text, json (one object per line) or journal (default journal when stderr is the "
       "journal, else text)",
       set_log_format},
      {"qmp-timeout-ms", Kind::value, "MS", "one QMP command (default 5000)",
       millis(member(&DaemonConfig::qmp_timeout))},
      {"unplug-timeout-ms", Kind::value, "MS", "device_del -> DEVICE_DELETED (default 10000)",
       millis(member(&DaemonConfig::unplug_timeout))},
      {"start-timeout-ms", Kind::value, "MS", "spawn -> QMP ready (default 30000)",
       millis(member(&DaemonConfig::start_timeout))},
      {"quit-timeout-ms", Kind::value, "MS", "graceful quit before the kill (default 3000)",
       millis(member(&DaemonConfig::quit_timeout))},
      {"pool", Kind::list, "SHAPE",
       "keep QEMUs of a shape spawned ahead, for creates of that shape that boot through "
       "firmware with a boot order: KEY=VALUE pairs, comma-separated, of machine (q35), "
       "memory_mib, vcpus, firmware (bios), pci_slots, count and for (create, or restore: "
       "they wait with -incoming defer for restores of that shape), e.g. "
       "memory_mib=256,count=2; with kernel, initrd and append, the QEMUs load that kernel and "
       "serve direct kernel boots of it (a comma in a value is written twice) "
       "(repeatable; docs/pool.md)",
       add_pool_shape},
      {"migration-listen", Kind::value, "ADDRESS:PORT",
       "take live migrations from brokers on other hosts here ([IPV6]:PORT; *:PORT for every "
       "address); needs the three --migration-* files or --insecure-migration",
       set_migration_listen},
      {"migration-cert", Kind::value, "FILE",
       "PEM certificate chain this broker shows other brokers, as destination and as source",
       path(member_of_migration(&MigrationTransport::cert))},
      {"migration-key", Kind::value, "FILE", "the private key of --migration-cert (PEM)",
       path(member_of_migration(&MigrationTransport::key))},
      {"migration-ca", Kind::value, "FILE",
       "PEM CA bundle another broker's certificate must chain to, both ways",
       path(member_of_migration(&MigrationTransport::ca))},
      {"insecure-migration", Kind::flag, "",
       "migrate to and from other hosts over plain TCP, with no certificates: anyone who can "
       "reach --migration-listen can hand this broker a guest, and the stream is readable on "
       "the wire",
       boolean(member_of_migration(&MigrationTransport::insecure))},
      {"parallel-starts", Kind::value, "N",
       "starts and destroys of different domains that run at once (default 4)",
       count(member(&DaemonConfig::parallel_starts), 1, 256)},
      {"log-max-bytes", Kind::value, "BYTES",
       "a QEMU's log (RUN/log/NAME.log) rotates to NAME.log.1 past this (default 1048576)",
       count(member(&DaemonConfig::log_max_bytes), 4096, 1ull << 30)},
      {"log-retention-ms", Kind::value, "MS",
       "the log of a domain that is gone is removed this long after its last line (default "
       "86400000, a day)",
       millis(member(&DaemonConfig::log_retention))},
      {"shutdown-grace-ms", Kind::value, "MS",
       "on SIGTERM, time for answers in flight (default 2000)",
       millis(member(&DaemonConfig::shutdown_grace))},
      {"request-timeout-ms", Kind::value, "MS",
       "a request must arrive within this, from its first byte (default 10000)",
       millis(limit(&L::request_timeout))},
      {"idle-timeout-ms", Kind::value, "MS",
       "keep-alive connections idle longer are closed (default 60000)",
       millis(limit(&L::idle_timeout))},
      {"write-timeout-ms", Kind::value, "MS", "a response must be read within this (default 10000)",
       millis(limit(&L::write_timeout))},
      {"heartbeat-ms", Kind::value, "MS",
       "event stream keep-alive comment interval (default 15000)", millis(limit(&L::heartbeat))},
      {"max-connections", Kind::value, "N", "connections served at once (default 1024)",
       count(limit(&L::max_connections), 1, 1u << 20)},
      {"max-connections-per-uid", Kind::value, "N",
       "connections one peer uid may hold (default 128)",
       count(limit(&L::max_connections_per_uid), 1, 1u << 20)},
      {"admin-reserve", Kind::value, "N",
       "connections kept for root beyond those limits, 2 per process (default 16)",
       count(limit(&L::admin_reserve), 0, 1u << 20)},
      {"max-body-bytes", Kind::value, "N", "request body limit (default 1048576)",
       count(limit(&L::max_body_bytes), 64, 1ull << 30)},
      {"max-header-bytes", Kind::value, "N", "request header limit (default 16384)",
       count(limit(&L::max_header_bytes), 512, 1u << 20)},
      {"event-queue", Kind::value, "N",
       "events queued per subscriber before it is dropped (default 256)",
       count(limit(&L::event_queue), 1, 1u << 20)},
  };
  return kOptions;
}

const Option* find(std::string_view name) {
  const auto& all = options();
  auto it = std::find_if(all.begin(), all.end(), [&](const Option& o) { return o.name == name; });
  return it == all.end() ? nullptr : &*it;
}

// ---- The command line (Boost.Program_options reads the syntax) ---------------------------------

struct CommandLine {
  Settings settings;
  std::vector<std::string> config_files;
  bool help = false;
  bool version = false;
  std::string help_man;
};

po::options_description flag_syntax() {
  po::options_description d;
  d.add_options()("help,h", "")("version", "")("config", po::value<std::string>(), "");
  // Not in --help: the build asks for the manual's option sections with it.
  d.add_options()("help-man", po::value<std::string>(), "");
  for (const auto& o : options()) {
    std::string name(o.name);
    // --xen alone means true; --xen=false is accepted as well.
    auto* value = o.kind == Kind::flag ? po::value<std::string>()->implicit_value("true")
                                       : po::value<std::string>();
    d.add_options()(name.c_str(), value, "");
  }
  return d;
}

// --name VALUE, --name=VALUE and -h; no abbreviations (--sock is not --socket), no bundling.
constexpr int kStyle =
    po::command_line_style::allow_long | po::command_line_style::long_allow_adjacent |
    po::command_line_style::long_allow_next | po::command_line_style::allow_short |
    po::command_line_style::allow_dash_for_short | po::command_line_style::short_allow_next;

Error syntax_error(const po::error_with_option_name& e) {
  using S = po::invalid_command_line_syntax;
  const auto* syntax = dynamic_cast<const S*>(&e);
  std::string message = e.what();
  if (syntax != nullptr &&
      (syntax->kind() == S::missing_parameter || syntax->kind() == S::empty_adjacent_parameter)) {
    message = "needs a value";
  } else if (syntax != nullptr && syntax->kind() == S::extra_parameter) {
    message = "takes no value";
  }
  return invalid(e.get_option_name(), message);
}

// Adds one parsed flag to the command line: an unknown flag or a stray argument is refused.
Result<void> add_flag(CommandLine& cl, const po::option& o) {
  std::string token = o.original_tokens.empty() ? o.string_key : o.original_tokens.front();
  if (o.unregistered && token.starts_with("-")) {
    return invalid(token.substr(0, token.find('=')), "unknown option (see --help)");
  }
  if (o.unregistered || o.position_key >= 0)
    return invalid(token, "unexpected argument (see --help)");
  if (o.string_key == "help") cl.help = true;
  if (o.string_key == "version") cl.version = true;
  if (o.string_key == "config") cl.config_files.push_back(o.value.at(0));
  if (o.string_key == "help-man") cl.help_man = o.value.at(0);
  const Option* opt = find(o.string_key);
  if (opt == nullptr) return {};
  auto& s = cl.settings[o.string_key];
  s.field = "--" + o.string_key;
  if (opt->kind != Kind::list) s.values.clear();  // the last one wins
  s.values.push_back(o.value.empty() ? "true" : o.value.front());
  return {};
}

Result<CommandLine> read_command_line(std::span<const std::string_view> args) {
  std::vector<std::string> argv(args.begin(), args.end());
  CommandLine cl;
  try {
    auto parsed = po::command_line_parser(argv)
                      .options(flag_syntax())
                      .style(kStyle)
                      .allow_unregistered()
                      .run();
    for (const auto& o : parsed.options) {
      if (auto ok = add_flag(cl, o); !ok) return ok.error();
    }
  } catch (const po::error_with_option_name& e) {
    return syntax_error(e);
  } catch (const po::error& e) {
    return invalid("arguments", e.what());
  }
  return cl;
}

// ---- Config files --------------------------------------------------------------------------

// A config value as the text a flag would carry.
Result<std::string> as_text(const Setting& s, Kind kind, const json::value& v) {
  if (kind == Kind::flag && !v.is_bool()) return invalid(s, "must be true or false");
  if (v.is_string()) return std::string(v.get_string());
  if (v.is_bool()) return std::string(v.get_bool() ? "true" : "false");
  if (v.is_uint64() || v.is_int64()) return std::to_string(v.to_number<long long>());
  return invalid(s, "must be a string, number or boolean");
}

// One config key's setting; a list option takes an array or a single value.
Result<Setting> config_setting(const Option& opt, std::string key, const json::value& v,
                               const std::string& file) {
  Setting s{{}, std::move(key), file};
  auto add = [&](const json::value& item) -> Result<void> {
    auto text = as_text(s, opt.kind, item);
    if (!text) return text.error();
    s.values.push_back(std::move(*text));
    return {};
  };
  if (opt.kind != Kind::list || !v.is_array()) {
    if (auto ok = add(v); !ok) return ok.error();
    return s;
  }
  for (const auto& item : v.get_array()) {
    if (auto ok = add(item); !ok) return ok.error();
  }
  return s;
}

Result<Settings> read_config_file(const std::string& file) {
  auto text = read_small_file(file);
  if (!text) return Error(make_error_code(errc::not_found), "--config: cannot read " + file);
  std::error_code ec;
  json::value v = json::parse(*text, ec);
  Setting whole{{}, "config", file};
  if (ec) return invalid(whole, "not valid JSON: " + ec.message());
  if (!v.is_object()) return invalid(whole, "must be a JSON object");
  Settings out;
  for (const auto& kv : v.get_object()) {
    std::string key(kv.key());
    const Option* opt = find(key);
    if (opt == nullptr) return invalid(Setting{{}, key, file}, "unknown config key");
    auto s = config_setting(*opt, key, kv.value(), file);
    if (!s) return s.error();
    out[key] = std::move(*s);
  }
  return out;
}

// ---- Merge and validate ------------------------------------------------------------------------

// A later source wins, option by option; a list given again replaces the earlier list.
void merge(Settings& into, Settings from) {
  for (auto& [name, s] : from) into[name] = std::move(s);
}

Result<DaemonConfig> validate(const Settings& settings) {
  DaemonConfig c;
  for (const auto& opt : options()) {
    auto it = settings.find(opt.name);
    if (it == settings.end()) continue;
    for (const auto& v : it->second.values) {
      if (auto complaint = opt.set(c, v)) return invalid(it->second, *complaint);
    }
  }
  if (c.xen && !c.pool.empty()) {
    return invalid(settings.at("pool"), "--pool does not apply with --xen: a Xen device model's "
                                        "uid is fixed by its domid");
  }
  // A shape's kernel and initrd are opened as a create's are: beneath an image root.
  for (const auto& shape : c.pool) {
    for (auto [key, path] : {std::pair{"kernel", &shape.kernel}, std::pair{"initrd", &shape.initrd}}) {
      if (path->empty()) continue;
      auto holds = [path](const std::string& root) {
        return path->starts_with(root.ends_with('/') ? root : root + "/");
      };
      if (std::none_of(c.image_roots.begin(), c.image_roots.end(), holds)) {
        return invalid(settings.at("pool"), std::string(key) + " " + *path +
                                                " is beneath no --image-root: no create could name it");
      }
    }
  }
  const bool any_file = !c.migration.cert.empty() || !c.migration.key.empty() || !c.migration.ca.empty();
  const bool all_files = !c.migration.cert.empty() && !c.migration.key.empty() && !c.migration.ca.empty();
  if (any_file && !all_files) {
    const char* missing = c.migration.cert.empty() ? "migration-cert"
                          : c.migration.key.empty() ? "migration-key"
                                                    : "migration-ca";
    const char* given = !c.migration.cert.empty() ? "migration-cert"
                        : !c.migration.key.empty() ? "migration-key"
                                                   : "migration-ca";
    return invalid(settings.at(given), std::string("TLS between brokers needs --") + missing +
                                           " as well: --migration-cert, --migration-key and "
                                           "--migration-ca go together");
  }
  if (all_files && c.migration.insecure) {
    return invalid(settings.at("insecure-migration"),
                   "--insecure-migration and the --migration-* certificates exclude each other");
  }
  if (!c.migration_listen.empty() && !c.migration.usable()) {
    return invalid(settings.at("migration-listen"),
                   "needs --migration-cert, --migration-key and --migration-ca, or "
                   "--insecure-migration to take plain TCP");
  }
  if (!c.migration_listen.empty() && c.xen) {
    return invalid(settings.at("migration-listen"), "does not apply with --xen");
  }
  if (settings.contains("uid-range") && settings.contains("uid-range-user")) {
    return invalid(settings.at("uid-range-user"),
                   "--uid-range and --uid-range-user exclude each other");
  }
  return c;
}

}  // namespace

Result<DaemonConfig> parse_config(std::span<const std::string_view> args) {
  auto cl = read_command_line(args);
  if (!cl) return cl.error();
  // The files first, in order, so that flags override them wherever --config appears.
  Settings settings;
  for (const auto& file : cl->config_files) {
    auto from_file = read_config_file(file);
    if (!from_file) return from_file.error();
    merge(settings, std::move(*from_file));
  }
  merge(settings, std::move(cl->settings));
  auto config = validate(settings);
  if (!config) return config.error();
  config->config_files = std::move(cl->config_files);
  config->help = cl->help;
  config->version = cl->version;
  config->help_man = std::move(cl->help_man);
  return config;
}

std::string usage() {
  std::string out =
      "usage: qbrokerd [--config FILE] [OPTION]...\n"
      "Runs QEMU deprivileged, one uid per domain, and serves the qbroker API on a Unix socket.\n"
      "Started by systemd, it takes the socket it is given (socket activation) and reports\n"
      "readiness with sd_notify; without systemd it binds --socket itself.\n\n"
      "  --config FILE                    JSON object whose keys are the option names below\n";
  for (const auto& o : options()) {
    std::string left =
        "  --";  // appends, not "literal" + string (a g++ 12 -Wrestrict false positive)
    left.append(o.name);
    if (!o.arg.empty()) left.append(" ").append(o.arg);
    if (left.size() < 34)
      left.resize(34, ' ');
    else
      left += " ";
    out += left + std::string(o.help) + "\n";
  }
  out +=
      "  -h, --help                       this text\n"
      "      --version                    print the version\n\n"
      "SIGTERM or SIGINT stops serving and exits; running domains are left running and are\n"
      "re-adopted by the next qbrokerd started on the same --state-dir and --run-dir.\n";
  return out;
}

std::vector<OptionDoc> option_docs() {
  std::vector<OptionDoc> out;
  for (const auto& o : options())
    out.push_back({o.name, o.arg, o.help, o.kind == Kind::list, o.kind == Kind::flag});
  return out;
}

}  // namespace broker::daemon
