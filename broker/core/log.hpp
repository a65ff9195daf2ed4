// Leveled, structured logging: a message and named fields (DOMAIN, JOB, UID, CODE, ROUTE...),
// written one record per line in one of three formats:
//   text     "qbroker[info] message KEY=value ..." on stderr (the default);
//   json     one JSON object per line on stderr, {"ts":..,"level":..,"msg":..,"domain":..}, the
//            field names in lower case, for log shippers (--log-format json);
//   journal  one sd_journal_send() record per message, the fields as journal fields, with
//            PRIORITY and SYSLOG_IDENTIFIER (chosen when stderr is the journal: JOURNAL_STREAM).
// Field names are journal field names: upper case letters, digits and '_'.
// Tests and the daemon set the level and the format; nothing else is global.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace broker::log {

enum class Level { debug, info, warn, error };
enum class Format { text, json, journal };

struct Field {
  std::string_view key;
  std::string value;
};
using Fields = std::span<const Field>;

void set_level(Level level);
// `journal` falls back to text when the build has no libsystemd.
void set_format(Format format);
Format format();
void write(Level level, std::string_view message, Fields fields = {});

using FieldList = std::initializer_list<Field>;
inline void debug(std::string_view m, FieldList f = {}) { write(Level::debug, m, {f.begin(), f.size()}); }
inline void info(std::string_view m, FieldList f = {}) { write(Level::info, m, {f.begin(), f.size()}); }
inline void warn(std::string_view m, FieldList f = {}) { write(Level::warn, m, {f.begin(), f.size()}); }
inline void error(std::string_view m, FieldList f = {}) { write(Level::error, m, {f.begin(), f.size()}); }

// The records as each format writes them, pure, for tests. `unix_us`: the time of the record.
std::string text_line(Level level, std::string_view message, Fields fields);
std::string json_line(Level level, std::string_view message, Fields fields, std::int64_t unix_us);
// "MESSAGE=...", "PRIORITY=6", "SYSLOG_IDENTIFIER=qbrokerd", then one "KEY=value" per field.
std::vector<std::string> journal_fields(Level level, std::string_view message, Fields fields);

// True when stderr is connected to the journal: JOURNAL_STREAM names its device and inode
// (systemd.exec(5)), so a unit's output can be sent as structured records instead.
bool stderr_is_journal();
// Sends one record to the journal; false when there is no journal or no libsystemd.
bool send_to_journal(const std::vector<std::string>& fields);

}  // namespace broker::log
