// Minimal leveled logging to stderr, one line per message: "qbrokerd[level] text".
// Tests and the daemon set the level; nothing else is global.
#pragma once

#include <string_view>

namespace broker::log {

enum class Level { debug, info, warn, error };

void set_level(Level level);
void write(Level level, std::string_view message);

inline void debug(std::string_view m) { write(Level::debug, m); }
inline void info(std::string_view m) { write(Level::info, m); }
inline void warn(std::string_view m) { write(Level::warn, m); }
inline void error(std::string_view m) { write(Level::error, m); }

}  // namespace broker::log
