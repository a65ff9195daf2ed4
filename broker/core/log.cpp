#include "broker/core/log.hpp"

#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>

#if QB_HAVE_SYSTEMD
#include <systemd/sd-journal.h>
#endif

namespace broker::log {
namespace {
std::atomic<Level> g_level{Level::info};
std::atomic<Format> g_format{Format::text};
constexpr std::string_view kNames[] = {"debug", "info", "warn", "error"};
// syslog(3) priorities: LOG_DEBUG, LOG_INFO, LOG_WARNING, LOG_ERR.
constexpr std::string_view kPriorities[] = {"7", "6", "4", "3"};

std::string_view name_of(Level level) { return kNames[static_cast<int>(level)]; }

void append_json_string(std::string& out, std::string_view s) {
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += '"';
}

std::string lower(std::string_view s) {
  std::string out(s);
  for (auto& c : out) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return out;
}

std::int64_t now_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

void write_stderr(const std::string& line) {
  // One write(2) per line keeps lines whole when several processes share stderr.
  [[maybe_unused]] auto n = ::write(STDERR_FILENO, line.data(), line.size());
}

}  // namespace

void set_level(Level level) { g_level = level; }

void set_format(Format format) {
#if !QB_HAVE_SYSTEMD
  if (format == Format::journal) format = Format::text;
#endif
  g_format = format;
}

Format format() { return g_format.load(); }

std::string text_line(Level level, std::string_view message, Fields fields) {
  std::string line = "qbroker[";
  line += name_of(level);
  line += "] ";
  line += message;
  for (const auto& f : fields) {
    line.append(" ").append(f.key).append("=").append(f.value);
  }
  line += '\n';
  return line;
}

std::string json_line(Level level, std::string_view message, Fields fields, std::int64_t unix_us) {
  char ts[40];
  std::snprintf(ts, sizeof(ts), "%lld.%06lld", static_cast<long long>(unix_us / 1000000),
                static_cast<long long>(unix_us % 1000000));
  std::string line = "{\"ts\":";
  line += ts;
  line += ",\"level\":";
  append_json_string(line, name_of(level));
  line += ",\"msg\":";
  append_json_string(line, message);
  for (const auto& f : fields) {
    line += ',';
    append_json_string(line, lower(f.key));
    line += ':';
    append_json_string(line, f.value);
  }
  line += "}\n";
  return line;
}

std::vector<std::string> journal_fields(Level level, std::string_view message, Fields fields) {
  std::vector<std::string> out;
  out.reserve(fields.size() + 3);
  out.push_back("MESSAGE=" + std::string(message));
  out.push_back("PRIORITY=" + std::string(kPriorities[static_cast<int>(level)]));
  out.emplace_back("SYSLOG_IDENTIFIER=qbrokerd");
  for (const auto& f : fields) out.push_back(std::string(f.key) + "=" + f.value);
  return out;
}

bool stderr_is_journal() {
  const char* stream = std::getenv("JOURNAL_STREAM");
  if (stream == nullptr) return false;
  unsigned long long dev = 0, ino = 0;
  if (std::sscanf(stream, "%llu:%llu", &dev, &ino) != 2) return false;
  struct stat st {};
  if (::fstat(STDERR_FILENO, &st) != 0) return false;
  return st.st_dev == dev && st.st_ino == ino;
}

bool send_to_journal(const std::vector<std::string>& fields) {
#if QB_HAVE_SYSTEMD
  std::vector<iovec> iov;
  iov.reserve(fields.size());
  for (const auto& f : fields) iov.push_back({const_cast<char*>(f.data()), f.size()});
  return ::sd_journal_sendv(iov.data(), static_cast<int>(iov.size())) == 0;
#else
  (void)fields;
  return false;
#endif
}

void write(Level level, std::string_view message, Fields fields) {
  if (level < g_level.load()) return;
  switch (g_format.load()) {
    case Format::journal:
      if (send_to_journal(journal_fields(level, message, fields))) return;
      break;  // the journal went away: the record still goes to stderr
    case Format::json:
      write_stderr(json_line(level, message, fields, now_us()));
      return;
    case Format::text:
      break;
  }
  write_stderr(text_line(level, message, fields));
}

}  // namespace broker::log
