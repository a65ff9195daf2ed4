// A migration between brokers on different hosts (docs/api.md, "POST
// /v1/domains/{name}/migrate"): one TCP connection from the source broker to the destination
// broker's --migration-listen address, TLS with certificates on both ends unless the brokers were
// started with --insecure-migration. QEMU never sees it: each broker hands its QEMU one end of a
// socketpair and relays between the other end and the connection.
//
//   source -> destination   one line: {"domain": described domain, "paused": bool}
//   destination -> source   one line: {"name": NAME} | {"error": {code, message, field?}}
//   source -> destination   the migration stream, relayed from the source QEMU's socketpair
//   destination -> source   one line once the domain runs there (or gave up): {"state": "running" |
//                           "paused"} | {"error": {...}}
//
// copy_storage adds one more connection per writable disk, made once the destination answered
// 201 with an "nbd" token in its body:
//
//   source -> destination   one line: {"nbd": that token}
//   destination -> source   one line: {"status": 200} | {"status": N, "body": error}
//   both ways               NBD, between the source QEMU's socketpair and the destination
//                           QEMU's NBD listener, until each side has half-closed
//
// A source restarted after its state had all gone asks on a link of its own:
//
//   source -> destination   one line: {"query": NAME}
//   destination -> source   one line: {"status": 200, "body": the domain as GET /v1/domains/NAME
//                           shows it} | {"status": 404, "body": error}
//
// The stream goes one way only (QEMU's return path is off), so the destination's last line needs
// no framing: nothing else flows towards the source.
#pragma once

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/json/value.hpp>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "broker/core/error.hpp"
#include "fdpass/unique_fd.hpp"

namespace boost::asio::ssl {
class context;
}

namespace broker {

// qbrokerd's --migration-cert, --migration-key, --migration-ca and --insecure-migration.
struct MigrationTransport {
  std::string cert;       // PEM chain this broker presents, as server and as client
  std::string key;        // its private key
  std::string ca;         // PEM bundle a peer's certificate must chain to
  bool insecure = false;  // plain TCP, no certificates, no authentication of the peer

  bool tls() const { return !cert.empty(); }
  bool usable() const { return tls() || insecure; }
};

// "tcp://HOST:PORT", HOST a name, an IPv4 address or a bracketed IPv6 address. Errors name `to`.
struct TcpTarget {
  std::string host;
  std::string port;
};
Result<TcpTarget> parse_tcp_target(std::string_view to);

// "HOST:PORT" for --migration-listen; an empty HOST or "*" listens on every address.
Result<boost::asio::ip::tcp::endpoint> parse_listen_address(std::string_view text);

// The TLS context of one side, certificates loaded and checked; TLS 1.3 only. Errors name the
// option whose file is at fault.
Result<std::shared_ptr<boost::asio::ssl::context>> make_tls_context(const MigrationTransport& t,
                                                                    bool server);

// Gives the AF_UNIX socket between a QEMU and its broker's relay 4 MiB of send and receive
// buffer: the relay then wakes once per few MiB rather than per 200 KiB, which measurably raises
// the relayed rate (bench/relay_bench). Best effort.
void widen_relay_buffers(int fd);

struct RelayStats {
  std::uint64_t bytes = 0;
};

// One connection between two brokers, TLS or plain. One read and one write may be in flight at
// once; close() ends both.
class MigrationLink {
 public:
  ~MigrationLink();
  MigrationLink(const MigrationLink&) = delete;
  MigrationLink& operator=(const MigrationLink&) = delete;

  // Connects, and with TLS shakes hands and checks the destination's certificate against the CA
  // and the target's host name. `tls` null: plain TCP.
  static boost::asio::awaitable<Result<std::unique_ptr<MigrationLink>>> connect(
      boost::asio::any_io_executor ex, std::shared_ptr<boost::asio::ssl::context> tls,
      TcpTarget target, std::chrono::milliseconds timeout);
  // Takes an accepted connection; with TLS shakes hands and requires a certificate of the CA.
  static boost::asio::awaitable<Result<std::unique_ptr<MigrationLink>>> accept(
      boost::asio::ip::tcp::socket sock, std::shared_ptr<boost::asio::ssl::context> tls,
      std::chrono::milliseconds timeout);

  // A JSON object on one line, at most `max` bytes, within `timeout`.
  boost::asio::awaitable<Result<boost::json::value>> read_message(
      std::size_t max, std::chrono::milliseconds timeout);
  boost::asio::awaitable<Result<void>> write_message(const boost::json::value& v);

  // Copies `local` to the link until `local` reads EOF (the source QEMU closed its end).
  boost::asio::awaitable<Result<RelayStats>> relay_from(fdpass::UniqueFd local);
  // Copies the link to `local` until the link ends or close(); shuts down `local`'s write side.
  boost::asio::awaitable<Result<RelayStats>> relay_to(fdpass::UniqueFd local);

  bool tls() const;
  std::string peer() const;  // "ADDRESS:PORT"
  // Ends the sending side (a TCP half-close): the peer reads the end of the stream, while this
  // side can still read. Closing instead, with bytes unread (TLS session tickets), would reset
  // the connection and could cost the peer the stream's last bytes.
  void shutdown_send();
  void close();

  struct Impl;

 private:
  explicit MigrationLink(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;  // shared with a watchdog timer's weak reference
};

// A relay run on its own (co_spawn): its result once it ended, and a timer cancelled then.
struct RelayWatch {
  explicit RelayWatch(boost::asio::any_io_executor ex);
  std::optional<Result<RelayStats>> result;
  boost::asio::steady_timer wake;
};
enum class RelayDirection { from_local, to_local };
// Runs link->relay_from(local) or link->relay_to(local) into `done`.
boost::asio::awaitable<void> watch_relay(std::shared_ptr<MigrationLink> link, fdpass::UniqueFd local,
                                         RelayDirection direction, std::shared_ptr<RelayWatch> done);
// Until `done` has a result, or `timeout`.
boost::asio::awaitable<void> wait_relay(RelayWatch& done, std::chrono::milliseconds timeout);

// An NBD connection (copy_storage between hosts): `local` to the link and the link to `local` at
// once, until both directions have ended; each end is passed on as a half-close. Closes the link.
boost::asio::awaitable<Result<void>> relay_both_ways(std::shared_ptr<MigrationLink> link,
                                                     fdpass::UniqueFd local);

}  // namespace broker
