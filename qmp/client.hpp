// qmp/ speaks QMP: a sans-I/O wire parser, id mux and write outbox, this Asio client and typed
// command builders.
//
// qmp::Client: an asynchronous QMP client that passes fds, a Boost.Asio shell (C++20 coroutines)
// performing the reads and writes the sans-I/O core (qmp/wire, qmp/mux, qmp/outbox) asks for.
//
// Protocol. connect() takes a connected Unix stream socket (a socketpair end, or a connection to
// QEMU's listening monitor socket), reads the greeting and sends qmp_capabilities without asking
// for out-of-band execution, so QEMU handles commands strictly in order and replies can be
// matched by position (the default) or by id (ClientOptions::ids; see qmp/mux.hpp). Then:
//  - execute() sends a command and returns QEMU's "return" value or an Error; never throws.
//  - execute_with_fd() sends the fd in the same sendmsg as the first bytes of the command (QEMU
//    takes an fd only together with the command that consumes it). At most one fd-carrying
//    command is in flight; later ones wait, in order, until its reply has come.
//  - Events go to every live EventSubscription: a bounded queue that drops its oldest events on
//    overflow and counts them.
//
// Concurrency. A client and its subscriptions live on one io_context thread. What to write, in
// which order, with which fd and when an fd must wait is decided by the sans-I/O qmp::Outbox
// (qmp/outbox.hpp); a single function performs the writes it asks for, and nothing else writes to
// the socket. A single reader coroutine reads, frames (LineDecoder), parses (one MessageParser
// per connection) and dispatches; it is the one await without a deadline (an idle monitor is
// normal), and it ends when the connection does.
//
// Deadlines. Every call that waits takes an absolute deadline. A command whose deadline passes
// before it was written is never sent; one that was sent is abandoned and its late reply dropped
// (see qmp/mux.hpp). Cancelling the awaiting coroutine (e.g. with awaitable_operators) does the
// same and yields errc::cancelled.
//
// Failure. Any protocol violation (see qmp/wire.hpp), I/O error, end of stream, or more than
// ClientOptions::max_abandoned commands left unanswered (errc::unresponsive) closes the
// connection: every waiting command fails with errc::disconnected naming the cause, subscriptions
// return errc::disconnected once drained, and close_reason() keeps the cause. Received fds (QEMU
// sends none) are closed at once and, beyond Limits::max_fds, close the connection.
//
// Lifetime. Destroying the Client closes the connection; commands still awaiting complete with
// errc::closed. Borrowed fds passed to execute_with_fd() must stay open until it returns.
#pragma once

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/json/value.hpp>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string_view>

#include "fdpass/unique_fd.hpp"
#include "qmp/commands.hpp"
#include "qmp/error.hpp"
#include "qmp/mux.hpp"
#include "qmp/wire.hpp"

namespace qmp {

using Clock = std::chrono::steady_clock;
using Deadline = Clock::time_point;

// A deadline `d` from now.
inline Deadline after(Clock::duration d) {
  return Clock::now() + d;
}

enum class Direction { to_qemu, from_qemu };

// Called with every line sent (without "\n"; `with_fd` when an fd went with it) and every line
// received (complete lines only, before they are parsed). For audits and tests. It runs inside
// the client's reader and writer, so it must not call back into the client.
using TranscriptHook = std::function<void(Direction, std::string_view line, bool with_fd)>;

struct ClientOptions {
  Limits limits;
  std::size_t read_size = 8192;     // bytes per read
  IdMode ids = IdMode::positional;  // ids on the wire or not (see qmp/mux.hpp)
  std::size_t max_abandoned = 256;  // unanswered commands tolerated (see qmp/mux.hpp)
  TranscriptHook transcript;
};

struct SubscriptionOptions {
  std::size_t capacity = 64;         // events kept; the oldest is dropped beyond this
  std::size_t max_bytes = 1u << 20;  // parsed bytes kept; the oldest is dropped beyond this
};

struct ClientStats {
  MuxCounters mux;
  std::uint64_t lines_sent = 0;
  std::uint64_t lines_received = 0;
  std::uint64_t events = 0;
  std::uint64_t fds_refused = 0;     // fds the peer attached (all closed)
  std::size_t peak_line_buffer = 0;  // largest read buffer the connection needed
};

namespace detail {
class Session;
struct SubscriptionState;
}  // namespace detail

// A bounded queue of the events received after it was created. Move-only; unsubscribes when
// destroyed. One waiter at a time.
class EventSubscription {
 public:
  EventSubscription(EventSubscription&&) noexcept;
  EventSubscription& operator=(EventSubscription&&) noexcept;
  ~EventSubscription();

  // The next event; errc::timeout at the deadline, errc::disconnected when the connection has
  // ended and nothing is queued, errc::busy when another call is already waiting.
  boost::asio::awaitable<Result<Event>> next(Deadline deadline);
  // The next event matching `pred`; events that do not match are consumed and discarded.
  boost::asio::awaitable<Result<Event>> wait_for(std::function<bool(const Event&)> pred,
                                                 Deadline deadline);
  std::optional<Event> try_next();

  std::size_t size() const noexcept;
  std::uint64_t dropped() const noexcept;  // events lost to overflow

 private:
  friend class Client;
  explicit EventSubscription(std::shared_ptr<detail::SubscriptionState> s);
  std::shared_ptr<detail::SubscriptionState> s_;
};

class Client {
 public:
  // Takes `sock`, reads the greeting and negotiates capabilities, all before `deadline`.
  // Errors: bad_socket, no_greeting (also when none came in time), negotiation_failed,
  // disconnected, and the protocol errors of qmp/wire.hpp.
  static boost::asio::awaitable<Result<std::unique_ptr<Client>>> connect(
      boost::asio::any_io_executor ex, fdpass::UniqueFd sock, Deadline deadline,
      ClientOptions options = {});

  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  const Greeting& greeting() const noexcept;

  // QEMU's "return" value, or: command_failed (qmp_class/qmp_desc set), timeout, cancelled,
  // disconnected, closed, invalid_command (also for add-fd/getfd, which need execute_with_fd).
  boost::asio::awaitable<Result<boost::json::value>> execute(Command command, Deadline deadline);
  // As execute(), with `fd` attached to the command's first byte. Only for commands that
  // consume an fd (Command::takes_fd); `fd` must stay open until this returns. The client
  // queues a duplicate of `fd` and closes it once sent or dropped; invalid_command when `fd` is
  // not open.
  boost::asio::awaitable<Result<boost::json::value>> execute_with_fd(Command command,
                                                                     fdpass::BorrowedFd fd,
                                                                     Deadline deadline);

  // Events from now on. Subscribe before sending the command whose event you will wait for.
  EventSubscription subscribe(SubscriptionOptions options = {});
  // Subscribes, then waits for the first matching event. Sees only events received after the
  // call; when the event may come early, use subscribe() before the triggering command.
  boost::asio::awaitable<Result<Event>> wait_for_event(std::function<bool(const Event&)> pred,
                                                       Deadline deadline);

  // Closes the connection; waiting commands complete with errc::closed. Idempotent.
  void close();
  bool is_open() const noexcept;
  // Why the connection ended, once it has.
  std::optional<Error> close_reason() const;
  ClientStats stats() const;

 private:
  explicit Client(std::shared_ptr<detail::Session> s);
  std::shared_ptr<detail::Session> s_;
};

}  // namespace qmp
