// qbrokerd's configuration: command-line flags and an optional JSON config file whose keys are
// the flag names without the dashes ({"state-dir": "/srv/qb", "image-root": ["/srv/iso"]}).
// Flags win over the file. Parsing is pure (the file is read, nothing else is touched), so it is
// tested directly; daemon.cpp turns the result into objects.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "broker/api/server.hpp"
#include "broker/core/error.hpp"

namespace broker::daemon {

// Far above regular and system users, and outside systemd's dynamic (61184-65519) and container
// (524288-1879048191) ranges; validated against /etc/passwd at start.
inline constexpr std::string_view kDefaultUidRange = "1879048192:4096";

struct DaemonOptions {
  std::string config_file;
  std::string socket = "/run/qbroker/qbroker.sock";
  std::string state_dir = "/var/lib/qbroker";
  std::string run_dir = "/run/qbroker";
  std::string uid_range;       // "BASE:COUNT"; empty: the default (or uid_range_user)
  std::string uid_range_user;  // libxl style: this user's uid is the base
  unsigned uid_count = 4096;   // with uid_range_user
  std::vector<std::string> image_roots;
  std::string qemu = "/usr/bin/qemu-system-x86_64";
  std::string admin_group;
  bool xen = false;
  std::string log_level = "info";

  std::chrono::milliseconds qmp_timeout{5000};
  std::chrono::milliseconds unplug_timeout{10000};
  std::chrono::milliseconds start_timeout{30000};
  std::chrono::milliseconds quit_timeout{3000};
  std::chrono::milliseconds shutdown_grace{2000};  // SIGTERM: time for answers in flight
  api::ServerLimits limits;

  bool help = false;
  bool version = false;
};

// `args` without argv[0].
Result<DaemonOptions> parse_options(std::span<const std::string_view> args);

// Applies one JSON config document (the file's content) to `opts`; unknown keys are refused by
// name.
Result<void> apply_config(DaemonOptions& opts, std::string_view json_text);

std::string usage();

}  // namespace broker::daemon
