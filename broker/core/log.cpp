#include "broker/core/log.hpp"

#include <unistd.h>

#include <atomic>
#include <string>

namespace broker::log {
namespace {
std::atomic<Level> g_level{Level::info};
constexpr std::string_view kNames[] = {"debug", "info", "warn", "error"};
}  // namespace

void set_level(Level level) { g_level = level; }

void write(Level level, std::string_view message) {
  if (level < g_level.load()) return;
  std::string line = "qbroker[";
  line += kNames[static_cast<int>(level)];
  line += "] ";
  line += message;
  line += '\n';
  // One write(2) per line keeps lines whole when several processes share stderr.
  [[maybe_unused]] auto n = ::write(STDERR_FILENO, line.data(), line.size());
}

}  // namespace broker::log
