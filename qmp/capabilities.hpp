// What a QEMU binary can do, read once per binary over QMP and cached.
//
// probe_capabilities() asks one running QEMU for query-version, query-qmp-schema and
// query-command-line-options(run-with); derive_capabilities() turns the replies into the typed
// flags the flows branch on. The schema is walked through its introspection entities (type names
// are masked as numbers), so flags reflect what the binary accepts, not what its version
// suggests; only behaviour that no schema shows (fdset lifetime, file: with fdsets) goes by
// version. CapabilityCache keys results by the binary's identity (device, inode, size, mtime),
// so an upgraded binary at the same path is probed again.
#pragma once

#include <sys/types.h>

#include <boost/asio/awaitable.hpp>
#include <boost/json/value.hpp>
#include <compare>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "qmp/client.hpp"
#include "qmp/error.hpp"
#include "qmp/wire.hpp"

namespace qmp {

struct Capabilities {
  Version version;

  // display-update {type: vnc, addresses: [{type: fd, str: NAME}]} is accepted (7.1+).
  bool display_update_vnc_fd = false;
  // The -run-with command-line option exists (8.1+), and has user= (9.1+).
  bool run_with = false;
  bool run_with_user = false;
  // Fdsets outlive monitor disconnects and must be removed with remove-fd (9.1+).
  bool fdset_explicit_remove = false;
  // migrate accepts "file:/dev/fdset/N" (8.2+).
  bool file_migration_fdset = false;

  // Arguments blockdev-change-medium takes.
  struct ChangeMediumArgs {
    bool id = false;              // select the drive by qdev id
    bool device = false;          // by legacy drive name (deprecated)
    bool read_only_mode = false;  // "read-only-mode"
    bool force = false;           // "force" (open a locked tray)
  } change_medium;

  std::vector<std::string> commands;  // sorted
  std::vector<std::string> events;    // sorted

  bool has_command(std::string_view name) const;
  bool has_event(std::string_view name) const;
};

// `schema` is the reply of query-qmp-schema; `run_with` the reply of
// query-command-line-options {option: "run-with"}, or nullptr when QEMU refused that query
// (no such option). Fails with bad_reply when the schema is malformed.
Result<Capabilities> derive_capabilities(const Version& version, const boost::json::value& schema,
                                         const boost::json::value* run_with);

// Runs the three queries on `client`, all before `deadline`.
boost::asio::awaitable<Result<Capabilities>> probe_capabilities(Client& client, Deadline deadline);

// Identity of a QEMU binary on disk.
struct BinaryId {
  dev_t dev = 0;
  ino_t ino = 0;
  std::int64_t size = 0;
  std::int64_t mtime_ns = 0;

  // stat()s `path` (following symlinks: the identity is the file that will be executed).
  static Result<BinaryId> of(const std::string& path);
  friend auto operator<=>(const BinaryId&, const BinaryId&) = default;
};

// Capabilities per binary, probed once. Single-threaded, like the client. Concurrent get()s for
// one binary share a single probe. The cache and the client must outlive a get() in progress.
class CapabilityCache {
 public:
  using Ptr = std::shared_ptr<const Capabilities>;

  // The cached capabilities of `binary`, or probes them on `client` (a QEMU started from that
  // binary). A failed probe is not cached.
  boost::asio::awaitable<Result<Ptr>> get(BinaryId binary, Client& client, Deadline deadline);
  Ptr find(const BinaryId& binary) const;
  void insert(const BinaryId& binary, Capabilities caps);
  std::size_t probes() const noexcept { return probes_; }

 private:
  struct Entry;
  std::map<BinaryId, std::shared_ptr<Entry>> entries_;
  std::size_t probes_ = 0;
};

}  // namespace qmp
