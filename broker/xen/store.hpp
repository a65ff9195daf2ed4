// broker/xen is the Xen dom0 mode (docs/xen.md): xenstore, the domain list, the device-model uid
// and kill conventions of libxl, QEMU's Xen command line and the backend disks.
//
// The broker's view of xenstore: libxenstore's client behind Result-returning calls. Every call
// blocks until xenstored answers (libxenstore has no asynchronous interface); watch events are
// queued by libxenstore's reader thread and taken without blocking, once fileno() turns readable.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "broker/core/error.hpp"

struct xs_handle;

namespace broker::xen {

// A transaction id; 0 is "no transaction" (XBT_NULL).
struct Tx {
  std::uint32_t id = 0;
};

// One entry of a node's permission list: 'n' none, 'r' read, 'w' write, 'b' both, for a domid.
// The first entry names the owner and what every domain not listed may do.
struct Perm {
  char kind = 'n';
  std::uint32_t domid = 0;
  bool operator==(const Perm&) const = default;
};
std::string to_string(const std::vector<Perm>& perms);  // "n0,r5"

struct WatchEvent {
  std::string path;
  std::string token;
};

class Store {
 public:
  // xs_open(0): $XENSTORED_PATH, else the daemon's socket, else /dev/xen/xenbus.
  static Result<Store> open();

  Store(Store&&) noexcept;
  Store& operator=(Store&&) noexcept;
  ~Store();

  // nullopt when the node does not exist.
  Result<std::optional<std::string>> read(std::string_view path, Tx tx = {});
  Result<void> write(std::string_view path, std::string_view value, Tx tx = {});
  Result<void> mkdir(std::string_view path, Tx tx = {});
  // Removes the subtree; a node that is already gone is not an error.
  Result<void> rm(std::string_view path, Tx tx = {});
  // The children's names; empty when the node does not exist.
  Result<std::vector<std::string>> directory(std::string_view path, Tx tx = {});
  Result<std::vector<Perm>> perms(std::string_view path, Tx tx = {});
  Result<void> set_perms(std::string_view path, const std::vector<Perm>& perms, Tx tx = {});

  // Runs `body` inside a transaction and commits. A commit xenstored refuses with EAGAIN (another
  // writer changed what the transaction touched) runs the body again in a new transaction, up to
  // `attempts` times; an error from the body aborts. Returns the attempts taken.
  Result<int> transact(const std::function<Result<void>(Tx)>& body, int attempts = 16);

  // Registers a watch; xenstored fires one event for it at once.
  Result<void> watch(std::string_view path, std::string_view token);
  Result<void> unwatch(std::string_view path, std::string_view token);
  // Readable when a watch event is queued.
  int fileno() const;
  // The events queued now, without blocking.
  Result<std::vector<WatchEvent>> take_events();

 private:
  explicit Store(xs_handle* h) : h_(h) {}
  xs_handle* h_ = nullptr;
};

}  // namespace broker::xen
