// The control endpoint's transport: HTTP/1.1 over a Unix stream socket with Boost.Beast. Each
// connection is authorized by SO_PEERCRED/SO_PEERGROUPS as it is accepted (root, the daemon's own
// uid, or a member of the admin group; anyone else gets 403 and is closed), then served with
// keep-alive. Requests go through the pure router (router.hpp) and the Service; GET /v1/events is
// streamed here as server-sent events.
//
// Requests are read strictly (RFC 9112): an HTTP/1.1 request needs one Host, folded header lines
// are refused, and a body is framed by Content-Length or by chunked alone. A head that fails
// these is answered 400 (501 for a transfer coding other than chunked) and the connection is
// closed before its body is read, so no bytes after it are taken for a second request.
//
// Limits (ServerLimits), each answered with a status and the JSON error body, then a close:
//   header over max_header_bytes                  431      body over max_body_bytes       413
//   request not complete within request_timeout   408      (counted from its first byte)
//   max_connections in total, or max_connections_per_uid from one peer uid, reached   503
//   (root and the daemon's own uid then get one of admin_reserve connections kept for them,
//   at most reserve_per_process per peer process; 503 when those are taken too)
// A connection idle between requests for idle_timeout is closed quietly; a response that the
// peer does not read within write_timeout closes the connection. A refused connection never
// holds a slot: its request head is read (refuse_timeout at most), it is answered, and what
// else it sends is read and dropped until it closes, so curl and qbrokerctl always get to read
// the answer instead of failing on a write to a closed socket. At most max_refusing refusals are
// answered that way at once; past them a refusal is one non-blocking send and a close, so a
// flood of connections costs the broker bounded memory and other peers are still served.
//
// Events: one bounded EventStream (event_queue entries) per subscriber. A consumer that falls
// behind gets a final "dropped" event and is disconnected, so memory stays bounded: when its
// queue overflows, or when it stops reading. Writing stops once half of its socket's send buffer
// is unread; a consumer that has not read by write_timeout is sent "dropped" (reason "stalled")
// into the half kept free, then closed. HTTP/1.0 subscribers get the stream without chunking.
//
// Threads: everything runs on the one io_context (docs/concurrency.md).
#pragma once

#include <sys/types.h>

#include <boost/asio/any_io_executor.hpp>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "broker/api/service.hpp"
#include "fdpass/unique_fd.hpp"

namespace broker::api {

struct ServerLimits {
  std::size_t max_header_bytes = 16 * 1024;
  std::size_t max_body_bytes = 1024 * 1024;
  std::chrono::milliseconds request_timeout{10000};  // first byte -> whole request read
  std::chrono::milliseconds idle_timeout{60000};     // keep-alive idle between requests
  std::chrono::milliseconds write_timeout{10000};    // one response (or one event) written
  std::size_t max_connections = 1024;
  std::size_t max_connections_per_uid = 128;
  // Beyond both limits, admin_reserve more connections for root and qbrokerd's own uid, at most
  // reserve_per_process of them from one peer process: an operator always reaches the daemon,
  // even when one root process holds every root slot or the pool is full.
  std::size_t admin_reserve = 16;
  std::size_t reserve_per_process = 2;
  // A refused connection (403, 503) has its request head read for at most refuse_timeout before
  // it is answered, then the rest of its request for as long again, so that a client writing
  // its request does not fail on the close before it reads the answer. At most max_refusing are
  // answered so at once; beyond that a refusal is one non-blocking send and a close.
  std::chrono::milliseconds refuse_timeout{1000};
  std::size_t max_refusing = 64;
  std::size_t event_queue = 256;               // events queued per subscriber
  std::chrono::milliseconds heartbeat{15000};  // SSE comment when no event came
};

struct PeerCred {
  pid_t pid = 0;
  uid_t uid = static_cast<uid_t>(-1);
  gid_t gid = static_cast<gid_t>(-1);
  std::vector<gid_t> groups;  // supplementary groups at connect time (SO_PEERGROUPS)
};

struct AccessPolicy {
  uid_t owner = 0;                 // the daemon's own uid is always allowed
  std::optional<gid_t> admin_gid;  // members of this group are allowed
};

// Pure: may this peer use the API?
bool authorized(const PeerCred& peer, const AccessPolicy& policy);

// The credentials of a connected Unix socket's peer.
std::optional<PeerCred> peer_credentials(int fd);

struct ServerStats {
  std::uint64_t accepted = 0;
  std::uint64_t accepted_reserve = 0;  // of accepted: into the operators' reserve
  std::uint64_t refused_unauthorized = 0;
  std::uint64_t refused_busy = 0;
  std::uint64_t requests = 0;
  std::uint64_t timeouts = 0;
  std::uint64_t events_sent = 0;
};

class Server {
 public:
  Server(boost::asio::any_io_executor ex, Service& service, ServerLimits limits,
         AccessPolicy access);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Serves connections on `listener`, a listening Unix stream socket (fdpass::listen_unix, or
  // the one systemd passed). Returns at once; the accept loop runs on the executor.
  Result<void> start(fdpass::UniqueFd listener);

  // Stops accepting, ends idle connections and event streams at once; a request that is being
  // executed is answered, then its connection closed. Domains are not touched.
  void stop();

  std::size_t connections() const;
  ServerStats stats() const;

  struct State;

 private:
  std::shared_ptr<State> state_;
};

}  // namespace broker::api
