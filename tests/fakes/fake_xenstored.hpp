// A fake xenstored on a Unix socket, for testing the Xen mode with the real libxenstore as its
// client: point XENSTORED_PATH at socket_path() and xs_open(0) connects here. There is no
// hypervisor on the test machines, and the real daemons need one to start.
//
// What it models, as C xenstored 4.17 does (docs/misc/xenstore.txt in Xen's tree):
//  - the tree: WRITE and MKDIR create missing parents with empty values and the parent's
//    permissions; RM removes a subtree, succeeds when the node is absent but its parent exists,
//    answers ENOENT when the parent is absent too, and EINVAL for "/";
//  - permissions n/r/w/b<domid>, the first word being the owner and everyone else's access; they
//    are validated and stored, never enforced: every socket client is dom0, and privileged;
//  - watches: WATCH fires once with the watched path (before its OK); a change fires every watch
//    on the changed path or an ancestor of it, with the changed path; RM also fires the watches
//    below the removed node, each with its own path; names starting with '@' fire only through
//    fire(), with the bare name (4.17 sends no domid with @releaseDomain);
//  - transactions: each works on a copy of the tree taken at TRANSACTION_START and logs its
//    changes; commit ("T") replays the log on the live tree and fires the watches then. The
//    conflict check is per node, like xenstored's: every node keeps the generation of its last
//    change (removed nodes keep a tombstone), and a commit answers EAGAIN when a node the
//    transaction read, listed or changed (or the parent of a node it created or removed: its list
//    of children changed) changed after the transaction started; a removal checks the removed
//    node, not its descendants. "F" discards. A connection's watches and transactions end with it;
//  - DIRECTORY answers E2BIG past 4096 bytes and DIRECTORY_PART serves the list in pieces, as
//    libxenstore then asks; GET_DOMAIN_PATH, RESET_WATCHES; CONTROL answers EINVAL, and every
//    other request type in xs_wire.h answers ENOSYS;
//  - strictness: a header whose type is not in xs_wire.h, a payload over 4096 bytes, or a request
//    whose NUL-terminated words lack their final NUL drops the connection (dropped_connections()).
//    C xenstored answers EINVAL to the last and ENOSYS to an unknown type: the fake is stricter so
//    that a client bug cannot hide behind an error reply.
// What it leaves out: relative paths (EINVAL, where xenstored resolves them against
// /local/domain/0); watch tokens too long for an event on a 3072-byte path (E2BIG); quotas and
// node size limits; INTRODUCE, RELEASE, IS_DOMAIN_INTRODUCED, RESUME and SET_TARGET (ENOSYS);
// the ring-page transport of guests; permission checks.
//
// Concurrency: one server thread polls the listener and every connection. Each connection has
// one output buffer that replies and events are appended to in the order they happen, under the
// one lock that also guards the tree. The events a request causes are queued before its reply,
// as xenstored does for WRITE: once a client has a reply, every event caused by its earlier
// requests, or by anything done before through the direct calls below, is on its socket already.
// The direct calls take the same lock.
#pragma once

#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace qbtest {

class FakeXenstored {
 public:
  explicit FakeXenstored(std::string socket_path);  // binds + listens; serves on its own thread
  ~FakeXenstored();  // stops, joins, closes every connection, unlinks the socket
  FakeXenstored(const FakeXenstored&) = delete;
  FakeXenstored& operator=(const FakeXenstored&) = delete;

  const std::string& socket_path() const;

  // Direct access for tests (no wire), thread-safe; write() and rm() fire watches like wire
  // requests and count as another writer for transactions. An invalid path throws.
  std::optional<std::string> read(const std::string& path) const;
  void write(const std::string& path, const std::string& value);
  void rm(const std::string& path);
  std::vector<std::string> directory(const std::string& path) const;  // sorted child names
  // The permission words joined by ',' ("n0,r5"); nullopt when the node is absent.
  std::optional<std::string> perms(const std::string& path) const;
  // Sends an event to every watch on `special` ("@releaseDomain", "@introduceDomain"); a name
  // without the leading '@' throws.
  void fire(const std::string& special);
  void fail_next_commits(int n);            // the next n TRANSACTION_END "T" answer EAGAIN
  std::size_t commits() const;              // successful commits so far
  std::size_t conflicts() const;            // commits answered EAGAIN so far
  std::size_t dropped_connections() const;  // connections dropped for a malformed message
  // The paths watched now, one entry per watch over every connection, sorted.
  std::vector<std::string> watched() const;

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace qbtest
