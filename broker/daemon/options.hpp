// qbrokerd's configuration: command-line flags and optional JSON config files whose keys are the
// flag names without the dashes ({"state-dir": "/srv/qb", "image-root": ["/srv/iso"]}), merged
// (flags win) and validated once into a DaemonConfig, each error naming the flag or the key.
// Parsing is pure (the files are read, nothing else is touched), so it is tested directly;
// what only the host can tell (users, groups, directories) is checked by daemon.cpp at start.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <span>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "broker/api/server.hpp"
#include "broker/control/migration_link.hpp"
#include "broker/core/error.hpp"
#include "broker/core/log.hpp"
#include "broker/domain/warm_pool.hpp"
#include "broker/lifecycle/uid_pool.hpp"

namespace broker::daemon {

// Far above regular and system users, and outside systemd's dynamic (61184-65519) and container
// (524288-1879048191) ranges; validated against /etc/passwd at start.
inline constexpr lifecycle::UidRange kDefaultUids{1879048192, 4096};
inline constexpr std::string_view kDefaultUidRange = "1879048192:4096";  // kDefaultUids, as text

// --uid-range-user: libxl style, the named user's uid is the base of the range. The name is
// looked up in the host's user database at start.
struct UidRangeUser {
  std::string name;
};

struct DaemonConfig {
  std::vector<std::string> config_files;  // --config, in the order given
  std::string socket = "/run/qbroker/qbroker.sock";
  std::string state_dir = "/var/lib/qbroker";
  std::string save_root;  // save files beneath it; empty: save and restore are refused
  std::string run_dir = "/run/qbroker";
  std::variant<lifecycle::UidRange, UidRangeUser> uids = kDefaultUids;
  uid_t uid_count = 4096;  // with UidRangeUser
  std::vector<std::string> image_roots;
  // Who may own a file opened read-write beneath an image root: user names or uids. Empty means
  // the default, root and the members of --admin-group (resolved at start by daemon.cpp).
  std::vector<std::string> image_owners;
  bool allow_hardlinks = false;  // hard-linked files beneath an image root are refused otherwise
  std::string qemu = "/usr/bin/qemu-system-x86_64";
  std::vector<std::string> qemu_data_dirs;  // -L for QEMU, bound read-only into its jail
  std::string admin_group;  // empty: root and the daemon's own uid only
  bool xen = false;
  bool xen_shared_uid = false;
  std::string xen_dev = "/dev/xen";
  std::string xen_reaper_lock = "/var/run/xen/dm-reaper-lock";
  log::Level log_level = log::Level::info;
  std::optional<log::Format> log_format;  // unset: the journal when stderr is the journal

  std::chrono::milliseconds qmp_timeout{5000};
  std::chrono::milliseconds unplug_timeout{10000};
  std::chrono::milliseconds start_timeout{30000};
  std::chrono::milliseconds quit_timeout{3000};
  std::chrono::milliseconds shutdown_grace{2000};  // SIGTERM: time for answers in flight
  std::size_t log_max_bytes = 1u << 20;             // a QEMU log rotates past this
  std::size_t parallel_starts = 4;                  // starts and destroys at once
  std::vector<PoolShape> pool;                      // --pool, the warm pool's shapes
  std::string migration_listen;      // ADDRESS:PORT taking migrations from other hosts; empty: none
  MigrationTransport migration;      // --migration-cert/-key/-ca, --insecure-migration
  std::chrono::milliseconds log_retention{86'400'000};  // logs of gone domains
  api::ServerLimits limits;

  bool help = false;
  bool version = false;
  std::string help_man;  // --help-man options|config: a manual section in roff (manual.hpp)
};

// `args` without argv[0]. The error names the flag ("--state-dir") or the config key
// ("state-dir", with the file in the message).
Result<DaemonConfig> parse_config(std::span<const std::string_view> args);

std::string usage();

// One option as --help shows it, for the manual pages, which are generated from the same table.
struct OptionDoc {
  std::string_view name;  // "state-dir": the flag without "--" and the config key
  std::string_view arg;   // "DIR"; empty for a flag that takes no value
  std::string help;
  bool list = false;  // repeatable flag, array in a config file
  bool flag = false;  // true or false
};
std::vector<OptionDoc> option_docs();

}  // namespace broker::daemon
