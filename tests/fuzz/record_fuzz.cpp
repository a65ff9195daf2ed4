// Fuzz target for the records a restarted broker reloads from its state directory: a domain
// record (RUN/domains/<name>.json, broker/domain/state_file) and a uid record
// (STATE/uids/<uid> holding a domain name, broker/lifecycle/uid_pool). Anyone who can write
// there already owns the broker, but a torn or hand-edited file must be refused, not crash it.
//
// Input: the whole input is a domain record. Its first line (up to '\n') is also a uid record's
// file name and the rest that file's content. Both are written to a private temporary directory
// (on /dev/shm when there is one) and read back by the loaders the broker uses at start-up
// (load_records, UidPool::load).
//
// Invariants checked (a violation aborts):
//  - a record that loads survives a round trip: state_to_json, then domain_from_json again, gives
//    the same JSON (after the first load, which may drop what the broker never writes);
//  - a record over read_small_file's 1 MiB is refused unread;
//  - UidPool::load keeps a file exactly when its name is a decimal uid, with the file's content
//    as the owner (empty when over 4 KiB), and UidRange::parse reads "BASE:COUNT" and nothing else.
#include <fcntl.h>
#include <unistd.h>

#include <boost/json/serialize.hpp>
#include <cerrno>
#include <charconv>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <string_view>

#include "broker/domain/state_file.hpp"
#include "broker/lifecycle/reaper.hpp"
#include "broker/lifecycle/uid_pool.hpp"

namespace {

namespace fs = std::filesystem;
namespace lifecycle = broker::lifecycle;

void check(bool ok) {
  if (!ok) std::abort();
}

// A private directory for the whole run, made once and removed at exit, on a tmpfs when there is
// one: creating and removing files on a disk's file system costs more than the parsing fuzzed
// here (ext4's inode allocation was half of each run).
const fs::path& scratch() {
  static const fs::path dir = [] {
    std::error_code no_shm;
    const fs::path base =
        fs::is_directory("/dev/shm", no_shm) ? fs::path("/dev/shm") : fs::temp_directory_path();
    std::string tmpl = (base / "qb-record-fuzz-XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr) std::abort();
    fs::create_directories(fs::path(tmpl) / "domains");
    fs::create_directories(fs::path(tmpl) / "state" / "uids");
    return fs::path(tmpl);
  }();
  // Registered once `dir` is made, so that it runs before `dir` is destroyed: handlers and
  // static destructors run in the reverse of the order they were registered.
  static const bool cleanup = std::atexit([] {
    std::error_code ec;
    fs::remove_all(scratch(), ec);
  }) == 0;
  check(cleanup);
  return dir;
}

void write_at(int fd, std::string_view bytes) {
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n =
        ::pwrite(fd, bytes.data() + done, bytes.size() - done, static_cast<off_t>(done));
    check(n > 0);
    done += static_cast<std::size_t>(n);
  }
}

void write_file(const std::string& path, std::string_view bytes) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  check(fd >= 0);
  write_at(fd, bytes);
  ::close(fd);
}

void check_round_trip(const broker::Domain& loaded) {
  auto first = boost::json::serialize(broker::state_to_json(loaded));
  auto again = broker::domain_from_json(broker::state_to_json(loaded));
  check(again.has_value());
  auto second = boost::json::serialize(broker::state_to_json(**again));
  check(first == second);
}

// The record stays between inputs, open and rewritten in place (the directory holds it alone):
// cut to the new size rather than emptied, so tmpfs keeps its pages.
void domain_record(std::string_view text) {
  static const std::string dir = (scratch() / "domains").string();
  static const int fd = ::open((dir + "/vm.json").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  check(fd >= 0);
  write_at(fd, text);
  check(::ftruncate(fd, static_cast<off_t>(text.size())) == 0);
  auto loaded = broker::load_records(dir);
  check(loaded.size() == 1);
  if (!loaded[0].domain) return;
  check(text.size() <= (std::size_t{1} << 20));
  check_round_trip(**loaded[0].domain);
}

// Kills nothing: loading never sweeps.
class NoKiller final : public lifecycle::UidKiller {
 public:
  std::error_code kill_all(uid_t, uid_t) override { std::abort(); }
};

bool decimal_uid(std::string_view s, uid_t& out) {
  if (s.empty()) return false;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
  return ec == std::errc() && p == s.data() + s.size();
}

bool usable_file_name(std::string_view name) {
  return !name.empty() && name.size() <= 255 && name != "." && name != ".." &&
         name.find_first_of(std::string_view("/\0", 2)) == std::string_view::npos;
}

void uid_record(std::string_view name, std::string_view owner) {
  // The range is read from the command line; its parser takes the same kind of numbers.
  auto range = lifecycle::UidRange::parse(name);
  if (range) {
    auto colon = name.find(':');
    uid_t base = 0;
    uid_t count = 0;
    check(colon != std::string_view::npos && decimal_uid(name.substr(0, colon), base) &&
          decimal_uid(name.substr(colon + 1), count));
    check(range->base == base && range->count == count);
  }
  if (!usable_file_name(name)) return;
  static const std::string state = (scratch() / "state").string();
  const std::string file = state + "/uids/" + std::string(name);
  write_file(file, owner);
  NoKiller killer;
  lifecycle::Reaper reaper(killer, 1000);
  lifecycle::UidPool pool({1000, 100}, state, reaper);
  auto in_use = pool.load();
  check(::unlink(file.c_str()) == 0 || errno == ENOENT);
  uid_t uid = 0;
  if (!decimal_uid(name, uid)) {
    check(in_use.empty());
    return;
  }
  check(in_use.size() == 1 && in_use.begin()->first == uid);
  check(in_use.begin()->second == (owner.size() <= 4096 ? owner : std::string_view()));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::string_view in(reinterpret_cast<const char*>(data), size);
  domain_record(in);
  auto nl = in.find('\n');
  if (nl != std::string_view::npos) uid_record(in.substr(0, nl), in.substr(nl + 1));
  return 0;
}
