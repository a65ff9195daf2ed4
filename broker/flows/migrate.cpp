// Live migration between two brokers (docs/flows.md, "Migration"). The source broker asks the
// destination to prepare an incoming domain; the destination answers with a one-time token and
// the path of a listener it opened; the source connects, sends the token, and each broker hands
// its end of the connection to its own QEMU with getfd. Neither QEMU opens anything.
//
//   destination: the domain as the source describes it (spec and devices with paths and
//   identities) -> every disk and medium reopened and checked as a restore does -> reserve the
//   name -> spawn (new uid) -S -incoming defer -> QMP -> devices re-plugged -> listener (0600,
//   RUN/migrate/TOKEN.sock) -> answer {token, endpoint} -> accept one connection -> the token,
//   read within a deadline and compared -> listener removed -> getfd -> migrate-incoming fd: ->
//   query-migrate until completed -> cont unless paused -> record.
//   source: connect -> token -> getfd -> migrate fd: (unthrottled) -> query-migrate until it ends.
// A destination that fails at any step tears its domain down by uid; a source whose migration
// fails or is cancelled keeps its guest, which QEMU resumes.
#include <fcntl.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/json.hpp>
#include <algorithm>
#include <cstring>

#include "broker/core/errc.hpp"
#include "broker/core/log.hpp"
#include "broker/domain/state_file.hpp"
#include "broker/flows/common.hpp"
#include "broker/flows/flows.hpp"
#include "broker/flows/stream.hpp"
#include "fdpass/devices.hpp"

namespace broker::flows {
namespace asio = boost::asio;
namespace json = boost::json;
using asio::awaitable;
using namespace detail;

namespace detail {

bool migration_busy(const std::string& st) {
  return st == "setup" || st == "active" || st == "device" || st == "pre-switchover" ||
         st == "cancelling" || st == "wait-unplug";
}

// Follows the old QEMU's migration until it ends, publishing progress; a cancel is a
// migrate_cancel.
awaitable<Result<qmp::reply::MigrationInfo>> follow_live(Context& ctx, Domain& d,
                                                         std::string job, CancelFlag cancel) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  auto last_event = start - std::chrono::hours(1);
  bool cancel_sent = false;
  asio::steady_timer tick(ctx.ex);
  for (;;) {
    // An eighth of the time so far, between 2 ms and migrate_poll: a short migration is seen
    // to end within 12.5% of its length, a long one costs a query every migrate_poll.
    const auto so_far = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start);
    tick.expires_after(std::clamp(so_far / 8, std::chrono::milliseconds(2),
                                  std::max(ctx.timeouts.migrate_poll, std::chrono::milliseconds(2))));
    co_await tick.async_wait(asio::as_tuple(asio::use_awaitable));
    qmp::Command query = qmp::cmd::query_migrate();
    auto r = co_await call(ctx, d, std::move(query));
    if (!r) co_return r.error();
    auto info = qmp::reply::migration(*r);
    if (!info) co_return from_qmp(info.error(), "query-migrate");
    if (cancel && *cancel && !cancel_sent) {
      cancel_sent = true;
      qmp::Command c = qmp::cmd::migrate_cancel();
      if (auto ok = co_await call(ctx, d, std::move(c)); !ok) log::warn(ok.error().describe());
    }
    const auto now = Clock::now();
    // In "setup" QEMU has no byte counts yet: nothing to report.
    const bool reportable = info->status != "setup";
    if (reportable &&
        (now - last_event >= std::chrono::milliseconds(250) || !migration_busy(info->status))) {
      last_event = now;
      const Follow what{job, true, 0};
      publish_progress(ctx, d, what, info->transferred, *info, now - start);
    }
    if (!migration_busy(info->status)) co_return *info;
  }
}

}  // namespace detail

namespace {

constexpr std::size_t kTokenBytes = 32;
constexpr auto kTick = std::chrono::milliseconds(2);
constexpr auto kTokenDeadline = std::chrono::seconds(5);

std::string new_token() {
  unsigned char raw[kTokenBytes];
  std::size_t got = 0;
  while (got < sizeof(raw)) {
    ssize_t n = ::getrandom(raw + got, sizeof(raw) - got, 0);
    if (n > 0) got += static_cast<std::size_t>(n);
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string hex;
  for (unsigned char c : raw) {
    hex += kHex[c >> 4];
    hex += kHex[c & 15];
  }
  return hex;
}

// Every byte compared, whatever the first difference: the time taken says nothing of the token.
bool same_token(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (std::size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

// The domain the source describes, checked as a restore checks a save file's header.
Result<std::shared_ptr<Domain>> described_domain(const json::value& described) {
  if (!described.is_object()) return field_error("domain", "must be an object");
  json::object o = described.as_object();
  o["instance"] = json::object{{"uid", 0},  {"pid", 0},      {"start_time", 0}, {"accel", "tcg"},
                               {"qmp", ""}, {"console", ""}, {"log", ""}};
  auto d = domain_from_json(o);
  if (!d) return field_error("domain", "is not a domain the broker can take: " + d.error().message);
  return d;
}

// A listener only root can connect to, at a fresh path beneath the run directory.
Result<fdpass::UniqueFd> listen_at(const std::string& path) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  if (path.size() >= sizeof(a.sun_path)) {
    return Error(make_error_code(errc::invalid_argument), "the migration listener path is too long: " + path);
  }
  std::memcpy(a.sun_path, path.c_str(), path.size() + 1);
  fdpass::UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd) return errno_error(errno, "migration: socket");
  const mode_t old_mask = ::umask(0177);
  const int bound = ::bind(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a));
  const int bind_errno = errno;
  ::umask(old_mask);
  if (bound != 0) return errno_error(bind_errno, "migration: binding " + path);
  if (::listen(fd.get(), 1) != 0) {
    ::unlink(path.c_str());
    return errno_error(errno, "migration: listening on " + path);
  }
  return fd;
}

bool passed(std::chrono::steady_clock::time_point deadline) {
  return std::chrono::steady_clock::now() >= deadline;
}

awaitable<void> tick(Context& ctx) {
  asio::steady_timer t(ctx.ex, kTick);
  co_await t.async_wait(asio::as_tuple(asio::use_awaitable));
}

// One connection from the source, within the deadline; a cancel ends the wait.
awaitable<Result<fdpass::UniqueFd>> accept_source(Context& ctx, const fdpass::UniqueFd& listener,
                                                  std::chrono::steady_clock::time_point deadline,
                                                  CancelFlag cancel) {
  for (;;) {
    fdpass::UniqueFd peer(::accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (peer) co_return peer;
    if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
      co_return errno_error(errno, "migration: accepting the source");
    }
    if (cancel && *cancel) co_return cancelled("the incoming migration");
    if (passed(deadline)) {
      co_return Error(make_error_code(errc::qemu_timeout), "migration: the source did not connect in time");
    }
    co_await tick(ctx);
  }
}

// The token line, read byte by byte so that nothing of the stream behind it is taken.
awaitable<Result<void>> check_token(Context& ctx, const fdpass::UniqueFd& peer, const std::string& token) {
  const int flags = ::fcntl(peer.get(), F_GETFL);
  ::fcntl(peer.get(), F_SETFL, flags | O_NONBLOCK);
  const auto deadline = std::chrono::steady_clock::now() + kTokenDeadline;
  std::string line;
  while (line.size() <= token.size()) {
    char c = 0;
    ssize_t n = ::read(peer.get(), &c, 1);
    if (n == 1 && c == '\n') break;
    if (n == 1) {
      line += c;
      continue;
    }
    if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) || passed(deadline)) {
      co_return Error(make_error_code(errc::forbidden), "migration: the source sent no token");
    }
    co_await tick(ctx);
  }
  ::fcntl(peer.get(), F_SETFL, flags);
  if (!same_token(line, token)) {
    co_return Error(make_error_code(errc::forbidden), "migration: the source sent a wrong token");
  }
  co_return Result<void>{};
}

// Waits for the incoming QEMU to take the whole state, publishing progress.
awaitable<Result<void>> incoming_completed(Context& ctx, Domain& d, CancelFlag cancel) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  auto last_event = start - std::chrono::hours(1);
  asio::steady_timer t(ctx.ex);
  for (;;) {
    if (cancel && *cancel) co_return cancelled("the incoming migration of " + d.name());
    qmp::Command query = qmp::cmd::query_migrate();
    auto r = co_await call(ctx, d, std::move(query));
    if (!r) co_return r.error();
    auto info = qmp::reply::migration(*r);
    if (!info) co_return from_qmp(info.error(), "query-migrate");
    const auto now = Clock::now();
    if (now - last_event >= std::chrono::milliseconds(250)) {
      last_event = now;
      const Follow what{"incoming", false, 0};
      publish_progress(ctx, d, what, info->transferred, *info, now - start);
    }
    if (info->status == "completed") co_return Result<void>{};
    if (info->status == "failed" || info->status == "cancelled") {
      co_return Error(make_error_code(errc::qemu_error),
                      "the incoming migration " + info->status + ": " +
                          info->error_desc.value_or("no reason given"));
    }
    // Short: the guest waits paused at the source until this side sees completed and runs it.
    t.expires_after(kTick);
    co_await t.async_wait(asio::as_tuple(asio::use_awaitable));
  }
}

awaitable<Result<void>> stream_in(Context& ctx, Domain& d, fdpass::UniqueFd peer, bool paused,
                                  CancelFlag cancel) {
  const std::string fd_name(kStreamFd);
  if (auto sent = co_await getfd(ctx, d, peer, fd_name); !sent) co_return sent.error();
  peer.reset();  // QEMU holds it now
  qmp::Command incoming = qmp::cmd::migrate_incoming_fd(fd_name);
  if (auto ok = co_await call(ctx, d, std::move(incoming)); !ok) co_return ok.error();
  if (auto ok = co_await incoming_completed(ctx, d, cancel); !ok) co_return ok.error();
  if (!paused) {
    qmp::Command cont = qmp::cmd::cont();
    if (auto ok = co_await call(ctx, d, std::move(cont)); !ok) co_return ok.error();
    d.set_state(RunState::running);
  }
  co_return Result<void>{};
}

// getfd, migrate fd: (unthrottled), then follow until QEMU's side ends.
awaitable<Result<qmp::reply::MigrationInfo>> stream_out_fd(Context& ctx, Domain& d,
                                                           fdpass::UniqueFd peer, CancelFlag cancel) {
  qmp::Command speed = qmp::cmd::migrate_set_max_bandwidth(qmp::cmd::kUnlimitedBandwidth);
  if (auto ok = co_await call(ctx, d, std::move(speed)); !ok) co_return ok.error();
  const std::string fd_name(kStreamFd);
  if (auto ok = co_await getfd(ctx, d, peer, fd_name); !ok) co_return ok.error();
  peer.reset();
  qmp::Command migrate = qmp::cmd::migrate_to_fd(fd_name);
  if (auto ok = co_await call(ctx, d, std::move(migrate)); !ok) {
    // QEMU still holds the connection: closed, the destination sees the stream end.
    qmp::Command close = qmp::cmd::closefd(fd_name);
    co_await call(ctx, d, std::move(close));
    co_return ok.error();
  }
  co_return co_await follow_live(ctx, d, "migrate", cancel);
}

// Connect, token, then the stream.
awaitable<Result<qmp::reply::MigrationInfo>> stream_out(Context& ctx, Domain& d, std::string endpoint,
                                                        std::string token, CancelFlag cancel) {
  auto peer = fdpass::connect_unix(endpoint);
  if (!peer) co_return errno_error(peer.error().value(), "migration: connecting to " + endpoint, "to");
  const std::string line = token + "\n";
  if (::send(peer->get(), line.data(), line.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(line.size())) {
    co_return errno_error(errno, "migration: sending the token to " + endpoint, "to");
  }
  co_return co_await stream_out_fd(ctx, d, std::move(*peer), cancel);
}

// What a source makes of its QEMU's side of the migration: done, or the guest resumed here.
awaitable<Result<void>> settle_out(Context& ctx, Domain& d, bool was_running,
                                   Result<qmp::reply::MigrationInfo> info, CancelFlag cancel) {
  if (info && info->status == "completed") {
    d.set_state(RunState::paused);
    co_return Result<void>{};
  }
  // QEMU resumes a guest whose migration failed or was cancelled; the destination tears its
  // half down once the connection ends.
  if (was_running) {
    if (auto ok = co_await ensure_running(ctx, d); !ok) log::warn(ok.error().describe());
  }
  if (cancel && *cancel) co_return cancelled("the migration of " + d.name());
  if (!info) co_return info.error();
  co_return Error(make_error_code(errc::qemu_error),
                  "the migration " + info->status + ": " + info->error_desc.value_or("no reason given"));
}

}  // namespace

awaitable<Result<Incoming>> prepare_incoming(Context& ctx, Domains& domains, IncomingRequest request) {
  auto described = described_domain(request.domain);
  if (!described) co_return described.error();
  if (auto ok = check_identities(ctx, **described); !ok) co_return ok.error();
  lifecycle::DomainSpec spec = (*described)->spec();
  spec.paused = request.paused;
  auto reserved = domains.reserve(std::move(spec));
  if (!reserved) co_return reserved.error();
  auto d = *reserved;
  const std::string name = d->name();
  auto job = d->begin_job("incoming");
  if (!job) {
    domains.unreserve(d);
    co_return job.error();
  }
  ctx.events.publish(name, "domain", "starting", {{"incoming", true}});
  std::vector<std::string> incoming{"-incoming", "defer"};
  if (auto ok = co_await domains.launch(d, nullptr, incoming); !ok) co_return ok.error();
  Incoming in{d, new_token(), request.listen_dir + "/" + new_token().substr(0, 32) + ".sock", {},
              std::move(*job)};
  Result<void> ready = co_await domains.attach(d);
  if (ready) {
    d->set_state(RunState::paused);
    ready = co_await replug(ctx, *d, **described);
  }
  if (ready) {
    auto listener = listen_at(in.endpoint);
    if (listener) in.listener = std::move(*listener);
    else ready = listener.error();
  }
  if (!ready) {
    in.job.release();
    co_await domains.teardown(d, false);
    ctx.events.publish(name, "domain", "failed", {{"error", ready.error().describe()}});
    co_return ready.error();
  }
  co_return in;
}

awaitable<Result<void>> receive_incoming(Context& ctx, Domains& domains, Incoming in,
                                         std::chrono::milliseconds wait, CancelFlag cancel) {
  auto d = in.domain;
  const std::string name = d->name();
  const auto deadline = std::chrono::steady_clock::now() + wait;
  auto peer = co_await accept_source(ctx, in.listener, deadline, cancel);
  in.listener.reset();
  ::unlink(in.endpoint.c_str());  // one connection, once
  Result<void> done = peer ? Result<void>{} : Result<void>(peer.error());
  if (done) done = co_await check_token(ctx, *peer, in.token);
  if (done) done = co_await stream_in(ctx, *d, std::move(*peer), d->spec().paused, cancel);
  in.job.release();
  if (done) done = co_await domains.records().persist(*d);
  if (!done) {
    co_await domains.teardown(d, false);
    ctx.events.publish(name, "domain", "failed", {{"error", done.error().describe()}});
    co_return done.error();
  }
  ctx.events.publish(name, "domain", "migrated-in",
                     {{"uid", d->instance().uid}, {"pid", d->instance().pid}});
  co_return Result<void>{};
}

awaitable<Result<void>> send_state(Context& ctx, Domain& d, std::string endpoint,
                                   std::string token, CancelFlag cancel) {
  const bool was_running = d.state() == RunState::running;
  auto info = co_await stream_out(ctx, d, std::move(endpoint), std::move(token), cancel);
  co_return co_await settle_out(ctx, d, was_running, std::move(info), cancel);
}

awaitable<Result<void>> send_state_fd(Context& ctx, Domain& d, fdpass::UniqueFd peer,
                                      CancelFlag cancel) {
  const bool was_running = d.state() == RunState::running;
  auto info = co_await stream_out_fd(ctx, d, std::move(peer), cancel);
  co_return co_await settle_out(ctx, d, was_running, std::move(info), cancel);
}

awaitable<Result<void>> resume_here(Context& ctx, Domain& d) { return ensure_running(ctx, d); }

json::value described_domain_of(const Domain& d) { return saved_domain(d); }

awaitable<void> recover_migrate(Context& ctx, Domain& d, json::object args) {
  qmp::Command query = qmp::cmd::query_migrate();
  auto r = co_await call(ctx, d, std::move(query));
  std::string status;
  if (r) {
    if (auto info = qmp::reply::migration(*r)) status = info->status;
  }
  if (status == "completed") {
    const auto* to = args.if_contains("to");
    log::error("domain " + d.name() + ": its interrupted migration" +
               (to != nullptr && to->is_string() ? " to " + std::string(to->get_string()) : "") +
               " had sent all of its state; the guest stays paused here so that it never runs "
               "twice: destroy it here if it runs there, or resume it");
    co_return;
  }
  co_await recover_save(ctx, d, std::move(args));
}

}  // namespace broker::flows
