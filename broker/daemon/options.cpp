#include "broker/daemon/options.hpp"

#include <algorithm>
#include <boost/json.hpp>
#include <charconv>
#include <functional>

#include "broker/core/atomic_file.hpp"
#include "broker/core/errc.hpp"
#include "broker/domain/requests.hpp"

namespace broker::daemon {
namespace json = boost::json;
namespace {

enum class Kind { string, list, flag, number, millis };

struct Option {
  std::string_view name;  // flag without "--", and the config file key
  Kind kind;
  std::string_view arg;
  std::string help;
  std::function<Result<void>(DaemonOptions&, std::string_view)> set;
};

Error bad(std::string_view name, std::string message) {
  return field_error(std::string("--") + std::string(name), std::move(message));
}

Result<unsigned long long> number(std::string_view name, std::string_view v, unsigned long long min,
                                  unsigned long long max) {
  unsigned long long n = 0;
  auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
  if (ec != std::errc() || p != v.data() + v.size() || n < min || n > max) {
    return bad(name, "must be a number from " + std::to_string(min) + " to " + std::to_string(max));
  }
  return n;
}

Result<void> absolute(std::string_view name, std::string_view v) {
  if (v.empty() || v.front() != '/') return bad(name, "must be an absolute path");
  return {};
}

template <class F>
Option str(std::string_view name, std::string_view arg, std::string_view help, F member,
           bool path = true) {
  return {name, Kind::string, arg, std::string(help),
          [name, member, path](DaemonOptions& o, std::string_view v) -> Result<void> {
            if (path) {
              if (auto ok = absolute(name, v); !ok) return ok;
            } else if (v.empty()) {
              return bad(name, "must not be empty");
            }
            o.*member = std::string(v);
            return {};
          }};
}

Option millis(std::string_view name, std::string_view help,
              std::chrono::milliseconds DaemonOptions::*member) {
  return {name, Kind::millis, "MS", std::string(help),
          [name, member](DaemonOptions& o, std::string_view v) -> Result<void> {
            auto n = number(name, v, 1, 24ull * 3600 * 1000);
            if (!n) return n.error();
            o.*member = std::chrono::milliseconds(*n);
            return {};
          }};
}

Option limit_ms(std::string_view name, std::string_view help,
                std::chrono::milliseconds api::ServerLimits::*member) {
  return {name, Kind::millis, "MS", std::string(help),
          [name, member](DaemonOptions& o, std::string_view v) -> Result<void> {
            auto n = number(name, v, 1, 24ull * 3600 * 1000);
            if (!n) return n.error();
            o.limits.*member = std::chrono::milliseconds(*n);
            return {};
          }};
}

Option limit_n(std::string_view name, std::string_view help, std::size_t api::ServerLimits::*member,
               unsigned long long min, unsigned long long max) {
  return {name, Kind::number, "N", std::string(help),
          [name, member, min, max](DaemonOptions& o, std::string_view v) -> Result<void> {
            auto n = number(name, v, min, max);
            if (!n) return n.error();
            o.limits.*member = *n;
            return {};
          }};
}

const std::vector<Option>& options() {
  static const std::vector<Option> kOptions = {
      str("socket", "PATH", "the API socket (default /run/qbroker/qbroker.sock)",
          &DaemonOptions::socket),
      str("state-dir", "DIR", "uid records (default /var/lib/qbroker)",
          &DaemonOptions::state_dir),
      str("run-dir", "DIR", "domain records, QMP/console sockets, logs, jails (default /run/qbroker)",
          &DaemonOptions::run_dir),
      {"uid-range", Kind::string, "BASE:COUNT",
       "QEMU uids base+1..base+count-1; base is the reaper uid (default " +
           std::string(kDefaultUidRange) + ")",
       [](DaemonOptions& o, std::string_view v) -> Result<void> {
         if (v.find(':') == std::string_view::npos) return bad("uid-range", "must be BASE:COUNT");
         o.uid_range = std::string(v);
         return {};
       }},
      str("uid-range-user", "NAME", "libxl style: the named user's uid is the base",
          &DaemonOptions::uid_range_user, false),
      {"uid-count", Kind::number, "N", "uids in the range with --uid-range-user (default 4096)",
       [](DaemonOptions& o, std::string_view v) -> Result<void> {
         auto n = number("uid-count", v, 2, 1u << 24);
         if (!n) return n.error();
         o.uid_count = static_cast<unsigned>(*n);
         return {};
       }},
      {"image-root", Kind::list, "DIR", "a directory user paths may name (repeatable)",
       [](DaemonOptions& o, std::string_view v) -> Result<void> {
         if (auto ok = absolute("image-root", v); !ok) return ok;
         o.image_roots.emplace_back(v);
         return {};
       }},
      str("qemu", "PATH", "the QEMU binary (default /usr/bin/qemu-system-x86_64)",
          &DaemonOptions::qemu),
      str("admin-group", "NAME", "members of this group may use the API (root always may)",
          &DaemonOptions::admin_group, false),
      {"xen", Kind::flag, "", "Xen dom0 mode (not built yet: refused)",
       [](DaemonOptions& o, std::string_view v) -> Result<void> {
         if (v != "true" && v != "false") return bad("xen", "must be true or false");
         o.xen = v == "true";
         return {};
       }},
      {"log-level", Kind::string, "LEVEL", "debug, info, warn or error (default info)",
       [](DaemonOptions& o, std::string_view v) -> Result<void> {
         if (v != "debug" && v != "info" && v != "warn" && v != "error") {
           return bad("log-level", "must be debug, info, warn or error");
         }
         o.log_level = std::string(v);
         return {};
       }},
      millis("qmp-timeout-ms", "one QMP command (default 5000)", &DaemonOptions::qmp_timeout),
      millis("unplug-timeout-ms", "device_del -> DEVICE_DELETED (default 10000)",
             &DaemonOptions::unplug_timeout),
      millis("start-timeout-ms", "spawn -> QMP ready (default 30000)",
             &DaemonOptions::start_timeout),
      millis("quit-timeout-ms", "graceful quit before the kill (default 3000)",
             &DaemonOptions::quit_timeout),
      millis("shutdown-grace-ms", "on SIGTERM, time for answers in flight (default 2000)",
             &DaemonOptions::shutdown_grace),
      limit_ms("request-timeout-ms",
               "a request must arrive within this, from its first byte (default 10000)",
               &api::ServerLimits::request_timeout),
      limit_ms("idle-timeout-ms", "keep-alive connections idle longer are closed (default 60000)",
               &api::ServerLimits::idle_timeout),
      limit_ms("write-timeout-ms", "a response must be read within this (default 10000)",
               &api::ServerLimits::write_timeout),
      limit_ms("heartbeat-ms", "event stream keep-alive comment interval (default 15000)",
               &api::ServerLimits::heartbeat),
      limit_n("max-connections", "connections served at once (default 1024)",
              &api::ServerLimits::max_connections, 1, 1u << 20),
      limit_n("max-connections-per-uid", "connections one peer uid may hold (default 128)",
              &api::ServerLimits::max_connections_per_uid, 1, 1u << 20),
      limit_n("max-body-bytes", "request body limit (default 1048576)",
              &api::ServerLimits::max_body_bytes, 64, 1ull << 30),
      limit_n("max-header-bytes", "request header limit (default 16384)",
              &api::ServerLimits::max_header_bytes, 512, 1u << 20),
      limit_n("event-queue", "events queued per subscriber before it is dropped (default 256)",
              &api::ServerLimits::event_queue, 1, 1u << 20),
  };
  return kOptions;
}

const Option* find(std::string_view name) {
  for (const auto& o : options()) {
    if (o.name == name) return &o;
  }
  return nullptr;
}

Result<void> check(const DaemonOptions& o) {
  if (!o.uid_range.empty() && !o.uid_range_user.empty()) {
    return bad("uid-range-user", "--uid-range and --uid-range-user exclude each other");
  }
  return {};
}

}  // namespace

Result<void> apply_config(DaemonOptions& opts, std::string_view text) {
  std::error_code ec;
  json::value v = json::parse(text, ec);
  if (ec) return field_error("config", "not valid JSON: " + ec.message());
  if (!v.is_object()) return field_error("config", "must be a JSON object");
  bool roots_seen = false;
  for (const auto& kv : v.get_object()) {
    std::string key(kv.key());
    const Option* opt = find(key);
    if (opt == nullptr || key == "config") return field_error(key, "unknown config key");
    auto apply = [&](const json::value& x) -> Result<void> {
      std::string s;
      if (x.is_string())
        s = std::string(x.get_string());
      else if (x.is_bool())
        s = x.get_bool() ? "true" : "false";
      else if (x.is_uint64() || x.is_int64())
        s = std::to_string(x.to_number<long long>());
      else
        return field_error(key, "must be a string, number or boolean");
      if (opt->kind == Kind::flag && !x.is_bool()) return field_error(key, "must be true or false");
      auto r = opt->set(opts, s);
      if (!r) {
        Error e = r.error();
        e.field = key;
        auto colon = e.message.find(':');
        e.message = key + (colon == std::string::npos ? ": " + e.message : e.message.substr(colon));
        return e;
      }
      return {};
    };
    if (opt->kind == Kind::list) {
      if (!roots_seen) opts.image_roots.clear();
      roots_seen = true;
      if (kv.value().is_array()) {
        for (const auto& item : kv.value().get_array()) {
          if (auto ok = apply(item); !ok) return ok;
        }
        continue;
      }
    }
    if (auto ok = apply(kv.value()); !ok) return ok;
  }
  return check(opts);
}

Result<DaemonOptions> parse_options(std::span<const std::string_view> args) {
  DaemonOptions o;
  // The config file first, so that flags override it wherever --config appears.
  for (std::size_t i = 0; i < args.size(); ++i) {
    std::string_view a = args[i];
    std::string_view value;
    if (a == "--config") {
      if (i + 1 >= args.size()) return bad("config", "needs a value");
      value = args[i + 1];
    } else if (a.rfind("--config=", 0) == 0) {
      value = a.substr(9);
    } else {
      continue;
    }
    o.config_file = std::string(value);
    auto text = read_small_file(o.config_file);
    if (!text) {
      return Error(make_error_code(errc::not_found), "--config: cannot read " + o.config_file);
    }
    if (auto ok = apply_config(o, *text); !ok) {
      Error e = ok.error();
      e.message = o.config_file + ": " + e.message;
      return e;
    }
  }
  bool roots_from_flags = false;
  for (std::size_t i = 0; i < args.size(); ++i) {
    std::string_view a = args[i];
    if (a == "-h" || a == "--help") {
      o.help = true;
      continue;
    }
    if (a == "--version") {
      o.version = true;
      continue;
    }
    if (a.rfind("--", 0) != 0) return field_error(a, "unexpected argument (see --help)");
    std::string_view name = a.substr(2);
    std::optional<std::string_view> value;
    if (auto eq = name.find('='); eq != std::string_view::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    }
    if (name == "config") {
      if (!value) ++i;
      continue;
    }
    const Option* opt = find(name);
    if (opt == nullptr) return field_error(a, "unknown option (see --help)");
    if (opt->kind == Kind::flag) {
      if (auto ok = opt->set(o, value.value_or("true")); !ok) return ok.error();
      continue;
    }
    if (!value) {
      if (i + 1 >= args.size()) return bad(name, "needs a value");
      value = args[++i];
    }
    if (opt->kind == Kind::list && !roots_from_flags) {
      o.image_roots.clear();  // flags replace the config file's list
      roots_from_flags = true;
    }
    if (auto ok = opt->set(o, *value); !ok) return ok.error();
  }
  if (auto ok = check(o); !ok) return ok.error();
  return o;
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

}  // namespace broker::daemon
