#include "qmp/client.hpp"

#include <fcntl.h>
#include <sys/socket.h>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <cerrno>
#include <cstring>
#include <deque>
#include <exception>
#include <utility>
#include <vector>

#include "fdpass/cmsg.hpp"
#include "fdpass/errc.hpp"
#include "qmp/outbox.hpp"

namespace qmp {
namespace asio = boost::asio;
namespace json = boost::json;

namespace {

constexpr auto kAwait = asio::as_tuple(asio::use_awaitable);

// What a refused command says: "blockdev-del: Node 'x' not found", or QEMU's desc alone when it
// names the command itself ("The command x has not been found"). The class is not repeated:
// it travels beside the message (Error::qmp_class), and the HTTP error body shows both.
std::string failure_message(const std::string& command, const std::string& desc) {
  if (desc.empty()) return command + ": QEMU refused it";
  if (desc.find(command) != std::string::npos) return desc;
  return command + ": " + desc;
}

// True when the awaiting coroutine was asked to stop (as opposed to a wake-up by cancel()).
asio::awaitable<bool> cancel_requested() {
  auto state = co_await asio::this_coro::cancellation_state;
  co_return state.cancelled() != asio::cancellation_type::none;
}

}  // namespace

namespace detail {

class Session;

// One command from execute() to its reply. Lives in the execute() coroutine frame; the session
// refers to it while it is queued or issued and forgets it before the frame goes away.
struct Waiter {
  Waiter(Session& s, asio::any_io_executor ex, std::string n, Deadline d)
      : session(s), timer(std::move(ex), d), name(std::move(n)) {}
  ~Waiter();
  Waiter(const Waiter&) = delete;
  Waiter& operator=(const Waiter&) = delete;

  enum class State { queued, issued, done };

  Session& session;
  asio::steady_timer timer;  // expires at the deadline; cancelled to wake the coroutine
  std::string name;          // the command's, for error messages
  State state = State::queued;
  Outbox<Waiter*>::Ticket ticket = 0;  // while queued
  Outbox<Waiter*>::Id id = 0;          // once issued
  std::optional<Result<json::value>> result;
};

struct SubscriptionState {
  SubscriptionState(asio::any_io_executor e, SubscriptionOptions o) : ex(std::move(e)), opts(o) {}

  // An event larger than the whole byte budget can never be kept.
  bool fits(const Event& e) const { return e.memory <= opts.max_bytes && opts.capacity > 0; }

  void push(Event&& e) {
    bytes += e.memory;
    queue.push_back(std::move(e));
    while (!queue.empty() && (queue.size() > opts.capacity || bytes > opts.max_bytes)) {
      bytes -= queue.front().memory;
      queue.pop_front();
      ++dropped;
    }
    wake();
  }
  void end(Error why) {
    if (ended) return;
    ended = true;
    end_reason = std::move(why);
    wake();
  }
  void wake() {
    if (waiter != nullptr) waiter->cancel();
  }
  Event pop() {
    Event e(std::move(queue.front()));
    bytes -= e.memory;
    queue.pop_front();
    return e;
  }

  asio::any_io_executor ex;
  SubscriptionOptions opts;
  std::deque<Event> queue;
  std::size_t bytes = 0;
  std::uint64_t dropped = 0;
  bool ended = false;
  Error end_reason;
  asio::steady_timer* waiter = nullptr;
};

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(asio::any_io_executor ex, ClientOptions o)
      : desc_(ex),
        opts_(std::move(o)),
        decoder_(opts_.limits.max_line, opts_.read_size),
        parser_(opts_.limits),
        outbox_(opts_.ids, opts_.max_abandoned) {}

  asio::any_io_executor executor() { return desc_.get_executor(); }
  const ClientOptions& options() const { return opts_; }
  bool open() const { return !closed_; }
  const std::optional<Greeting>& greeting() const { return greeting_; }
  const std::optional<Error>& close_reason() const { return reason_; }
  void set_greeting_wake(asio::steady_timer* t) { greeting_wake_ = t; }

  Result<void> adopt(fdpass::UniqueFd sock) {
    int domain = 0;
    int type = 0;
    socklen_t len = sizeof(int);
    bool ok = ::getsockopt(sock.get(), SOL_SOCKET, SO_DOMAIN, &domain, &len) == 0;
    len = sizeof(int);
    ok = ok && ::getsockopt(sock.get(), SOL_SOCKET, SO_TYPE, &type, &len) == 0;
    sockaddr_storage peer{};
    socklen_t plen = sizeof(peer);
    ok = ok && ::getpeername(sock.get(), reinterpret_cast<sockaddr*>(&peer), &plen) == 0;
    if (!ok || domain != AF_UNIX || type != SOCK_STREAM) {
      return Error{errc::bad_socket, "QMP needs a connected Unix stream socket"};
    }
    boost::system::error_code ec;
    desc_.assign(sock.get(), ec);
    if (ec) return Error{errc::io_error, "cannot watch the QMP socket: " + ec.message()};
    (void)sock.release();  // the descriptor object owns it now and closes it in close()
    desc_.native_non_blocking(true, ec);
    if (ec) {
      close(Error{errc::io_error, "cannot make the QMP socket non-blocking: " + ec.message()});
      return *reason_;
    }
    return {};
  }

  void start_reader() {
    auto self = shared_from_this();
    asio::co_spawn(executor(), read_loop(self), [self](std::exception_ptr e) {
      if (!e) return;
      // Only a bug or memory exhaustion gets here; record it rather than lose it.
      std::string what = "reader stopped";
      try {
        std::rethrow_exception(e);
      } catch (const std::exception& ex) {
        what += std::string(": ") + ex.what();
      } catch (...) {
      }
      self->close(Error{errc::io_error, what});
    });
  }

  // Queues `cmd` (with `fd` on its first byte when valid) and writes what the socket takes.
  void enqueue(Waiter& w, EncodedCommand cmd, fdpass::UniqueFd fd) {
    w.ticket = outbox_.push(std::move(cmd), &w, std::move(fd));
    flush();
  }

  // The waiter gives up (deadline, cancellation, destruction).
  void forget(Waiter& w) {
    const auto state = std::exchange(w.state, Waiter::State::done);
    if (state == Waiter::State::queued) {
      outbox_.cancel(w.ticket);
    } else if (state == Waiter::State::issued) {
      outbox_.abandon(w.id);
      if (outbox_.unresponsive()) {
        close(Error{errc::unresponsive,
                    std::to_string(outbox_.mux().abandoned()) + " commands left unanswered"});
      }
    }
  }

  std::shared_ptr<SubscriptionState> subscribe(SubscriptionOptions o) {
    auto s = std::make_shared<SubscriptionState>(executor(), o);
    if (closed_) {
      s->end(*reason_);
    } else {
      std::erase_if(subs_, [](const auto& w) { return w.expired(); });
      subs_.push_back(s);
    }
    return s;
  }

  // Closes the connection and fails everything waiting on it. Idempotent.
  void close(Error why) {
    if (closed_) return;
    closed_ = true;
    reason_ = why;
    boost::system::error_code ignored;
    desc_.close(ignored);  // cancels the reader's and the writer's waits
    const bool local = why.is(errc::closed);
    // Fds of commands never written are closed here.
    outbox_.close([&](Waiter* w) {
      w->state = Waiter::State::done;
      w->result =
          local ? Error{errc::closed, w->name + ": QMP client closed"}
                : Error{errc::disconnected, w->name + ": QMP connection lost: " + why.message};
      w->timer.cancel();
    });
    decoder_.clear();
    if (greeting_wake_ != nullptr) greeting_wake_->cancel();
    Error ended{errc::disconnected, "QMP connection lost: " + why.message};
    if (local) ended = Error{errc::closed, "QMP client closed"};
    for (auto& weak : subs_) {
      if (auto s = weak.lock()) s->end(ended);
    }
    subs_.clear();
  }

  ClientStats stats() const {
    ClientStats s = stats_;
    s.mux = outbox_.mux().counters();
    s.peak_line_buffer = decoder_.peak_capacity();
    return s;
  }

 private:
  // The single writer: sends what the outbox says to, in one sendmsg each, until the outbox has
  // nothing to send now (empty, or held at the fd gate: a reply resumes it) or the socket is full
  // (then resumes when it drains). Runs only on the io thread, never while a send is waiting.
  void flush() {
    if (closed_ || write_wait_) return;
    const fdpass::BorrowedFd sock(desc_.native_handle());
    while (auto w = outbox_.next_write()) {
      const fdpass::BorrowedFd fds[1] = {w->fd};
      auto r = fdpass::send_with_fds(sock, std::as_bytes(std::span(w->bytes)),
                                     std::span(fds, w->fd.valid() ? 1 : 0));
      if (!r) return send_failed(r.error());
      if (auto issued = outbox_.commit_write(*r)) on_issued(*issued);
    }
  }

  void on_issued(const Outbox<Waiter*>::Issued& i) {
    i.slot->id = i.id;
    i.slot->state = Waiter::State::issued;
    ++stats_.lines_sent;
    if (opts_.transcript) opts_.transcript(Direction::to_qemu, i.line, i.with_fd);
  }

  void send_failed(std::error_code ec) {
    if (ec == fdpass::errc::would_block) {
      write_wait_ = true;
      desc_.async_wait(asio::posix::descriptor_base::wait_write,
                       [self = shared_from_this()](boost::system::error_code wec) {
                         self->write_wait_ = false;
                         if (!wec) self->flush();
                       });
      return;
    }
    close(Error{errc::io_error, "send: " + ec.message()});
  }

  static asio::awaitable<void> read_loop(std::shared_ptr<Session> self) {
    const std::size_t max_fds = self->opts_.limits.max_fds;
    bool readable = true;  // try a read before the first wait
    while (!self->closed_) {
      if (!readable) {
        self->decoder_.release_if_empty();  // an idle connection holds no read buffer
        // Asio re-arms the descriptor for every wait (EPOLL_CTL_MOD), so data that arrived
        // since the last read is reported at once: no read is needed to prove the socket empty.
        auto [wec] =
            co_await self->desc_.async_wait(asio::posix::descriptor_base::wait_read, kAwait);
        if (wec) {
          if (!self->closed_) self->close(Error{errc::io_error, "wait: " + wec.message()});
          co_return;
        }
      }
      auto buf = self->decoder_.prepare(self->opts_.read_size);
      auto r = fdpass::recv_with_fds(fdpass::BorrowedFd(self->desc_.native_handle()),
                                     std::as_writable_bytes(buf), max_fds);
      if (!r) {
        std::error_code ec = r.error();
        if (ec == fdpass::errc::would_block) {
          readable = false;
          continue;
        }
        if (ec == fdpass::errc::too_many_fds || ec == fdpass::errc::control_truncated) {
          ++self->stats_.fds_refused;
          self->close(Error{errc::unexpected_fds, "the peer attached file descriptors"});
          co_return;
        }
        self->close(Error{errc::io_error, "recv: " + ec.message()});
        co_return;
      }
      if (!r->fds.empty()) {
        self->stats_.fds_refused += r->fds.size();
        r->fds.clear();  // closes them
      }
      if (r->bytes == 0) {
        self->close(Error{errc::disconnected, "the peer closed the connection"});
        co_return;
      }
      // A short read drained the socket; a full one may have left more behind.
      readable = r->bytes == buf.size();
      self->decoder_.commit(r->bytes);
      for (;;) {
        auto line = self->decoder_.next_line();
        if (!line) {
          self->close(line.error());
          co_return;
        }
        if (!*line) break;
        self->on_line(**line);
        if (self->closed_) co_return;
      }
    }
  }

  void on_line(std::string_view line) {
    ++stats_.lines_received;
    if (opts_.transcript) opts_.transcript(Direction::from_qemu, line, false);
    auto msg = parser_.parse(line);
    if (!msg) return close(msg.error());
    // QEMU 7.2 was seen to send RESUME ahead of the greeting to a client that connected while
    // it started: the monitor thread accepts the client and a main-thread event reaches the
    // session before the greeting does. An event is harmless there; a reply is not.
    if (!greeting_ && !std::holds_alternative<Greeting>(*msg) &&
        !std::holds_alternative<Event>(*msg)) {
      constexpr std::size_t kShown = 200;
      std::string shown(line.substr(0, kShown));
      if (line.size() > kShown) shown += "...";
      return close(Error{errc::no_greeting, "the first message was not a QMP greeting: " + shown});
    }
    std::visit([this](auto& m) { on_message(m); }, *msg);
    if (!closed_ && outbox_.writable()) flush();
  }

  void on_message(Greeting& g) {
    if (greeting_) {
      // QEMU 10 was seen to greet a client twice when it connected while QEMU was still closing
      // the previous client's session. The same greeting again says nothing new; another one
      // would be a second session on one socket.
      if (g.version.to_string() == greeting_->version.to_string() &&
          g.capabilities == greeting_->capabilities) {
        return;
      }
      return close(Error{errc::unexpected_message, "a second, different QMP greeting"});
    }
    greeting_ = std::move(g);
    if (greeting_wake_ != nullptr) greeting_wake_->cancel();
  }

  void on_message(Return& r) {
    auto d = outbox_.on_reply(r.id, false);
    if (d.outcome != Outbox<Waiter*>::Outcome::complete) return;
    Waiter& w = **d.slot;
    complete(w, Result<json::value>(std::move(r.value)));
  }

  void on_message(ErrorReply& e) {
    auto d = outbox_.on_reply(e.id, true);
    if (d.outcome != Outbox<Waiter*>::Outcome::complete) return;
    Waiter& w = **d.slot;
    std::string msg = failure_message(w.name, e.desc);
    complete(w, Error{errc::command_failed, std::move(msg), std::move(e.error_class),
                      std::move(e.desc)});
  }

  void on_message(Event& e) {
    ++stats_.events;
    std::erase_if(subs_, [](const auto& w) { return w.expired(); });
    for (std::size_t i = 0; i < subs_.size(); ++i) {
      auto s = subs_[i].lock();
      if (!s->fits(e)) {
        ++s->dropped;
        continue;
      }
      if (i + 1 == subs_.size()) {
        s->push(std::move(e));
      } else {
        // The last subscription takes the event itself; the others get copies.
        s->push(Event{e.name, json::object(e.data, json::storage_ptr()), e.timestamp, e.memory});
      }
    }
  }

  static void complete(Waiter& w, Result<json::value> r) {
    w.state = Waiter::State::done;
    w.result.emplace(std::move(r));
    w.timer.cancel();
  }

  asio::posix::stream_descriptor desc_;
  ClientOptions opts_;
  LineDecoder decoder_;
  MessageParser parser_;    // one per connection: its JSON parser is reused for every line
  Outbox<Waiter*> outbox_;  // what is not yet written and what awaits a reply
  bool write_wait_ = false;
  bool closed_ = false;
  std::optional<Error> reason_;
  std::optional<Greeting> greeting_;
  asio::steady_timer* greeting_wake_ = nullptr;
  std::vector<std::weak_ptr<SubscriptionState>> subs_;
  ClientStats stats_;
};

Waiter::~Waiter() {
  if (state != State::done) session.forget(*this);
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------

namespace {

using detail::Session;
using detail::Waiter;

asio::awaitable<Result<json::value>> run_command(std::shared_ptr<Session> s, Command cmd,
                                                 fdpass::BorrowedFd fd, bool with_fd,
                                                 Deadline deadline) {
  if (cmd.takes_fd && !with_fd) {
    co_return Error{errc::invalid_command, cmd.name + ": needs an fd (use execute_with_fd)"};
  }
  if (!cmd.takes_fd && with_fd) {
    co_return Error{errc::invalid_command, cmd.name + ": does not consume an fd"};
  }
  if (with_fd && !fd.valid()) {
    co_return Error{errc::invalid_command, cmd.name + ": no fd given"};
  }
  if (!s->open()) {
    const Error& why = *s->close_reason();
    if (why.is(errc::closed)) co_return Error{errc::closed, cmd.name + ": QMP client closed"};
    co_return Error{errc::disconnected, cmd.name + ": QMP connection lost: " + why.message};
  }
  auto enc = encode_command(cmd.name, cmd.args, s->options().limits);
  if (!enc) co_return enc.error();
  // The outbox owns what it sends: a copy of the caller's fd, closed once sent or dropped.
  fdpass::UniqueFd own;
  if (with_fd) {
    own.reset(::fcntl(fd.get(), F_DUPFD_CLOEXEC, 0));
    if (!own.valid()) {
      const int err = errno;
      co_return Error{err == EBADF ? errc::invalid_command : errc::io_error,
                      cmd.name + ": cannot duplicate the fd: " + std::strerror(err)};
    }
  }

  Waiter w(*s, s->executor(), cmd.name, deadline);
  s->enqueue(w, std::move(*enc), std::move(own));
  while (!w.result) {
    auto [ec] = co_await w.timer.async_wait(kAwait);
    if (w.result) break;
    if (!ec) {
      s->forget(w);
      w.result = Error{errc::timeout, cmd.name + ": no reply before the deadline"};
    } else if (co_await cancel_requested()) {
      s->forget(w);
      w.result = Error{errc::cancelled, cmd.name + ": cancelled"};
    }
  }
  co_return std::move(*w.result);
}

asio::awaitable<Result<Event>> next_event(std::shared_ptr<detail::SubscriptionState> s,
                                          std::function<bool(const Event&)> pred,
                                          Deadline deadline) {
  auto take = [&]() -> std::optional<Event> {
    while (!s->queue.empty()) {
      Event e = s->pop();
      if (!pred || pred(e)) return e;
    }
    return std::nullopt;
  };
  if (auto e = take()) co_return std::move(*e);
  if (s->ended) co_return s->end_reason;
  if (s->waiter != nullptr) co_return Error{errc::busy, "subscription already has a waiter"};

  asio::steady_timer timer(s->ex, deadline);
  s->waiter = &timer;
  struct Unhook {
    detail::SubscriptionState& s;
    ~Unhook() { s.waiter = nullptr; }
  } unhook{*s};
  for (;;) {
    auto [ec] = co_await timer.async_wait(kAwait);
    if (auto e = take()) co_return std::move(*e);
    if (s->ended) co_return s->end_reason;
    if (!ec) co_return Error{errc::timeout, "no matching QMP event before the deadline"};
    if (co_await cancel_requested()) co_return Error{errc::cancelled, "event wait cancelled"};
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------

EventSubscription::EventSubscription(std::shared_ptr<detail::SubscriptionState> s)
    : s_(std::move(s)) {}
EventSubscription::EventSubscription(EventSubscription&&) noexcept = default;
EventSubscription& EventSubscription::operator=(EventSubscription&&) noexcept = default;
EventSubscription::~EventSubscription() = default;

asio::awaitable<Result<Event>> EventSubscription::next(Deadline deadline) {
  return next_event(s_, nullptr, deadline);
}

asio::awaitable<Result<Event>> EventSubscription::wait_for(std::function<bool(const Event&)> pred,
                                                           Deadline deadline) {
  return next_event(s_, std::move(pred), deadline);
}

std::optional<Event> EventSubscription::try_next() {
  if (s_->queue.empty()) return std::nullopt;
  return s_->pop();
}

std::size_t EventSubscription::size() const noexcept {
  return s_->queue.size();
}
std::uint64_t EventSubscription::dropped() const noexcept {
  return s_->dropped;
}

// ---------------------------------------------------------------------------------------------

Client::Client(std::shared_ptr<detail::Session> s) : s_(std::move(s)) {}

Client::~Client() {
  close();
}

asio::awaitable<Result<std::unique_ptr<Client>>> Client::connect(asio::any_io_executor ex,
                                                                 fdpass::UniqueFd sock,
                                                                 Deadline deadline,
                                                                 ClientOptions options) {
  auto s = std::make_shared<Session>(ex, std::move(options));
  if (auto r = s->adopt(std::move(sock)); !r) co_return r.error();
  s->start_reader();

  // Until connect succeeds, leaving this frame in any way closes the session.
  struct Guard {
    Session& s;
    bool done = false;
    ~Guard() {
      s.set_greeting_wake(nullptr);
      if (!done) s.close(Error{errc::closed, "QMP connect abandoned"});
    }
  } guard{*s};

  asio::steady_timer wake(ex, deadline);
  s->set_greeting_wake(&wake);
  while (!s->greeting() && s->open()) {
    auto [ec] = co_await wake.async_wait(kAwait);
    if (s->greeting() || !s->open()) break;
    if (!ec) {
      Error e{errc::no_greeting, "no QMP greeting before the deadline"};
      s->close(e);
      co_return e;
    }
    if (co_await cancel_requested()) co_return Error{errc::cancelled, "QMP connect cancelled"};
  }
  s->set_greeting_wake(nullptr);
  if (!s->greeting()) co_return s->close_reason()->with_context("QMP greeting");

  auto r = co_await run_command(s, cmd::qmp_capabilities(), {}, false, deadline);
  if (!r) {
    Error e = r.error();
    if (e.is(errc::command_failed)) e.code = make_error_code(errc::negotiation_failed);
    s->close(e);
    co_return e;
  }
  guard.done = true;
  co_return std::unique_ptr<Client>(new Client(std::move(s)));
}

const Greeting& Client::greeting() const noexcept {
  return *s_->greeting();
}

asio::awaitable<Result<json::value>> Client::execute(Command command, Deadline deadline) {
  return run_command(s_, std::move(command), {}, false, deadline);
}

asio::awaitable<Result<json::value>> Client::execute_with_fd(Command command, fdpass::BorrowedFd fd,
                                                             Deadline deadline) {
  return run_command(s_, std::move(command), fd, true, deadline);
}

EventSubscription Client::subscribe(SubscriptionOptions options) {
  return EventSubscription(s_->subscribe(options));
}

asio::awaitable<Result<Event>> Client::wait_for_event(std::function<bool(const Event&)> pred,
                                                      Deadline deadline) {
  return next_event(s_->subscribe(SubscriptionOptions{}), std::move(pred), deadline);
}

void Client::close() {
  s_->close(Error{errc::closed, "closed by the client"});
}
bool Client::is_open() const noexcept {
  return s_->open();
}
std::optional<Error> Client::close_reason() const {
  return s_->close_reason();
}
ClientStats Client::stats() const {
  return s_->stats();
}

}  // namespace qmp
