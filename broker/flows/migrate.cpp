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
// copy_storage adds, at the destination after the plug: the writable disks opened at the paths
// the source names (refused when they are the source's own images) -> NBD listener (0600,
// RUN/migrate/RANDOM.nbd) -> getfd -> nbd-server-start fd: (one connection per disk) ->
// block-export-add of each disk's format node, writable; once the state arrived, nbd-server-stop.
// At the source, after the token: per disk, connect -> getfd -> blockdev-add nbd over the fd ->
// blockdev-mirror sync full -> query-block-jobs until every mirror is ready; then the migration,
// with pause-before-switchover: in "pre-switchover" (the guest stopped) each mirror is cancelled
// softly, which brings it level and ends it, its NBD node deleted, and migrate-continue.
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

awaitable<Result<void>> finish_mirrors(Context& ctx, Domain& d,
                                       const std::vector<std::string>& disks);

// Follows the old QEMU's migration until it ends, publishing progress; a cancel is a
// migrate_cancel.
awaitable<Result<qmp::reply::MigrationInfo>> follow_live(Context& ctx, Domain& d,
                                                         std::string job, CancelFlag cancel,
                                                         const std::vector<std::string>& mirrors) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  auto last_event = start - std::chrono::hours(1);
  bool cancel_sent = false;
  bool switched = false;
  std::optional<Error> failure;  // the mirrors could not be finished: the migration is cancelled
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
    if (info->status == "pre-switchover" && !switched && !cancel_sent) {
      switched = true;
      auto level = co_await finish_mirrors(ctx, d, mirrors);
      if (level) {
        qmp::Command go_on = qmp::cmd::migrate_continue_pre_switchover();
        if (auto went = co_await call(ctx, d, std::move(go_on)); !went) level = went.error();
      }
      if (!level) failure = level.error();
    }
    if (((cancel && *cancel) || failure) && !cancel_sent) {
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
    if (!migration_busy(info->status)) {
      if (failure) co_return *failure;
      co_return *info;
    }
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

// copy_storage, at the destination: the disks the source names must not be its own images.
// Checked before the spawn (a clear refusal rather than QEMU's image lock) and again on what
// was plugged.
Result<void> not_the_source(const std::string& id, const std::string& path,
                            const fdpass::Identity& here, const fdpass::Identity& source) {
  if (!here.same_object(source)) return {};
  return field_error("disk_paths." + id,
                     path + " is the source's own image of disk " + id +
                         ": copy_storage needs an image of its own at the destination; name it "
                         "in disk_paths");
}

Result<void> check_own_images(Context& ctx, const Domain& described,
                              const std::vector<std::string>& fresh) {
  for (const auto& id : fresh) {
    const DiskState& disk = described.disks.at(id);
    auto opened = ctx.roots.open(disk.spec.path, {.access = fdpass::Access::read_only});
    if (!opened) return from_open(opened.error(), "disk_paths." + id, disk.spec.path);
    if (auto ok = not_the_source(id, disk.spec.path, opened->identity, disk.identity); !ok) return ok;
  }
  return {};
}

Result<void> check_plugged_own(const Domain& d, const Domain& described,
                               const std::vector<std::string>& fresh) {
  for (const auto& id : fresh) {
    const DiskState& source = described.disks.at(id);
    auto it = d.disks.find(id);
    if (it == d.disks.end()) continue;
    if (auto ok = not_the_source(id, source.spec.path, it->second.identity, source.identity); !ok)
      return ok;
  }
  return {};
}

// The destination's NBD server: a listener only root can connect to, handed to QEMU, which
// takes one connection per disk; each disk's format node exported writable under its id.
awaitable<Result<void>> export_disks(Context& ctx, Domain& d, const std::vector<std::string>& disks,
                                     const std::string& path) {
  auto listener = listen_at(path);
  if (!listener) co_return listener.error();
  const std::string fd_name(kNbdListenerFd);
  Result<void> ok = co_await getfd(ctx, d, *listener, fd_name);
  listener->reset();  // QEMU holds it now
  if (ok) {
    qmp::Command start =
        qmp::cmd::nbd_server_start_fd(fd_name, static_cast<std::uint32_t>(disks.size()));
    if (auto r = co_await call(ctx, d, std::move(start)); !r) ok = r.error();
  }
  for (const auto& id : disks) {
    if (!ok) break;
    qmp::Command add = qmp::cmd::block_export_add_nbd(export_id(id), format_node(id), id);
    if (auto r = co_await call(ctx, d, std::move(add)); !r) ok = r.error();
  }
  if (!ok) ::unlink(path.c_str());
  co_return ok;
}

// copy_storage, at the source: QEMU's mirror jobs among its block jobs.
awaitable<Result<std::vector<qmp::reply::BlockJobInfo>>> mirror_jobs(
    Context& ctx, Domain& d, const std::vector<std::string>& disks) {
  qmp::Command q = qmp::cmd::query_block_jobs();
  auto r = co_await call(ctx, d, std::move(q));
  if (!r) co_return r.error();
  auto jobs = qmp::reply::block_jobs(*r);
  if (!jobs) co_return from_qmp(jobs.error(), "query-block-jobs");
  std::vector<qmp::reply::BlockJobInfo> ours;
  for (auto& j : *jobs) {
    for (const auto& id : disks) {
      if (j.id == mirror_job(id)) ours.push_back(std::move(j));
    }
  }
  co_return ours;
}

// A mirror job that failed, named by its disk: the destination's image is the likely cause.
Error copy_failed(const qmp::reply::BlockJobInfo& job, const std::vector<std::string>& disks) {
  std::string id = job.id;
  for (const auto& disk : disks) {
    if (mirror_job(disk) == job.id) id = disk;
  }
  Error e(make_error_code(errc::qemu_error),
          "copy_storage: the copy of disk " + id + " into the destination's image failed: " +
              job.error.value_or("the job ended " + job.status));
  e.field = "disk_paths." + id;
  return e;
}

// Best effort, for a copy that failed, was cancelled or was left by an earlier broker: every
// mirror job cancelled outright and dismissed, every NBD node and its fd name gone.
awaitable<void> drop_mirrors(Context& ctx, Domain& d, const std::vector<std::string>& disks) {
  const auto deadline = std::chrono::steady_clock::now() + ctx.timeouts.qmp;
  std::vector<std::string> cancelled_jobs;
  for (;;) {
    auto jobs = co_await mirror_jobs(ctx, d, disks);
    if (!jobs || jobs->empty()) break;
    for (const auto& j : *jobs) {
      if (j.status == "concluded") {
        qmp::Command dismiss = qmp::cmd::job_dismiss(j.id);
        if (auto r = co_await call(ctx, d, std::move(dismiss)); !r) log::warn(r.error().describe());
      } else if (std::find(cancelled_jobs.begin(), cancelled_jobs.end(), j.id) == cancelled_jobs.end()) {
        cancelled_jobs.push_back(j.id);
        qmp::Command stop = qmp::cmd::block_job_cancel(j.id, true);
        if (auto r = co_await call(ctx, d, std::move(stop)); !r) log::warn(r.error().describe());
      }
    }
    if (passed(deadline)) {
      log::warn("domain " + d.name() + ": its storage copy's jobs did not end");
      break;
    }
    co_await tick(ctx);
  }
  for (const auto& id : disks) {
    qmp::Command del = qmp::cmd::blockdev_del(mirror_node(id));
    co_await call(ctx, d, std::move(del));  // absent unless the copy got that far
    qmp::Command close = qmp::cmd::closefd(mirror_node(id));
    co_await call(ctx, d, std::move(close));
  }
}

void publish_storage(Context& ctx, const Domain& d, std::uint64_t bytes, std::uint64_t total,
                     std::chrono::steady_clock::duration took) {
  const double secs = std::chrono::duration<double>(took).count();
  ctx.events.publish(d.name(), "job", "progress",
                     {{"job", "migrate"},
                      {"phase", "storage"},
                      {"bytes", bytes},
                      {"total", total},
                      {"rate", secs > 0 ? static_cast<double>(bytes) / secs : 0.0},
                      {"fraction", total != 0 ? static_cast<double>(bytes) / static_cast<double>(total) : 0.0}});
}

// Each disk mirrored into its export on the destination's NBD listener, until every copy is
// level (ready). The guest runs meanwhile; its writes go on being copied.
Result<fdpass::UniqueFd> nbd_connection(StorageCopy& storage, const std::string& id) {
  if (auto it = storage.connected.find(id); it != storage.connected.end()) {
    fdpass::UniqueFd fd = std::move(it->second);
    storage.connected.erase(it);
    return fd;
  }
  auto sock = fdpass::connect_unix(storage.nbd_endpoint);
  if (!sock) {
    return errno_error(sock.error().value(),
                       "copy_storage: connecting to the destination's NBD listener " +
                           storage.nbd_endpoint,
                       "to");
  }
  return std::move(*sock);
}

awaitable<Result<void>> mirror_storage(Context& ctx, Domain& d, StorageCopy& storage,
                                       CancelFlag cancel) {
  for (const auto& id : storage.disks) {
    auto sock = nbd_connection(storage, id);
    if (!sock) co_return sock.error();
    const std::string node = mirror_node(id);
    if (auto ok = co_await getfd(ctx, d, *sock, node); !ok) co_return ok.error();
    sock->reset();
    qmp::Command add = qmp::cmd::blockdev_add(qmp::cmd::NbdNode{node, node, id});
    if (auto r = co_await call(ctx, d, std::move(add)); !r) co_return r.error();
    qmp::Command mirror = qmp::cmd::blockdev_mirror(mirror_job(id), format_node(id), node);
    if (auto r = co_await call(ctx, d, std::move(mirror)); !r) co_return r.error();
  }
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  auto last_event = start - std::chrono::hours(1);
  asio::steady_timer t(ctx.ex);
  for (;;) {
    if (cancel && *cancel) co_return cancelled("the migration of " + d.name());
    auto jobs = co_await mirror_jobs(ctx, d, storage.disks);
    if (!jobs) co_return jobs.error();
    std::uint64_t bytes = 0;
    std::uint64_t total = 0;
    bool level = jobs->size() == storage.disks.size();
    for (const auto& j : *jobs) {
      if (j.status == "concluded" || j.error) co_return copy_failed(j, storage.disks);
      bytes += j.offset;
      total += j.len;
      level = level && j.ready;
    }
    const auto now = Clock::now();
    if (level || now - last_event >= std::chrono::milliseconds(250)) {
      last_event = now;
      publish_storage(ctx, d, bytes, total, now - start);
    }
    if (level) co_return Result<void>{};
    const auto so_far = std::chrono::duration_cast<std::chrono::milliseconds>(now - start);
    t.expires_after(std::clamp(so_far / 8, kTick,
                               std::max(ctx.timeouts.migrate_poll, kTick)));
    co_await t.async_wait(asio::as_tuple(asio::use_awaitable));
  }
}

}  // namespace

namespace detail {

// In "pre-switchover" the guest is stopped: each mirror, cancelled softly, copies what is left
// and ends, its target then level with the source; its NBD node goes, which closes the
// connection, so the destination's exports are idle when it runs the guest.
awaitable<Result<void>> finish_mirrors(Context& ctx, Domain& d, const std::vector<std::string>& disks) {
  for (const auto& id : disks) {
    qmp::Command c = qmp::cmd::block_job_cancel(mirror_job(id), false);
    if (auto r = co_await call(ctx, d, std::move(c)); !r) co_return r.error();
  }
  const auto deadline = std::chrono::steady_clock::now() + ctx.timeouts.migrate_settle;
  for (;;) {
    auto jobs = co_await mirror_jobs(ctx, d, disks);
    if (!jobs) co_return jobs.error();
    const bool ended = std::all_of(jobs->begin(), jobs->end(),
                                   [](const auto& j) { return j.status == "concluded"; });
    if (ended) {
      std::optional<Error> failed;
      if (jobs->size() != disks.size()) {
        failed = Error(make_error_code(errc::qemu_error), "copy_storage: a mirror job is gone");
      }
      for (const auto& j : *jobs) {
        if (j.error && !failed) failed = copy_failed(j, disks);
        qmp::Command dismiss = qmp::cmd::job_dismiss(j.id);
        if (auto r = co_await call(ctx, d, std::move(dismiss)); !r) co_return r.error();
      }
      if (failed) co_return *failed;
      break;
    }
    if (passed(deadline)) {
      co_return Error(make_error_code(errc::qemu_timeout),
                      "copy_storage: the disks' copies did not come level with the stopped guest");
    }
    co_await tick(ctx);
  }
  for (const auto& id : disks) {
    qmp::Command del = qmp::cmd::blockdev_del(mirror_node(id));
    if (auto r = co_await call(ctx, d, std::move(del)); !r) co_return r.error();
  }
  co_return Result<void>{};
}

}  // namespace detail

namespace {

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
                                  bool exporting, CancelFlag cancel) {
  const std::string fd_name(kStreamFd);
  if (auto sent = co_await getfd(ctx, d, peer, fd_name); !sent) co_return sent.error();
  peer.reset();  // QEMU holds it now
  qmp::Command incoming = qmp::cmd::migrate_incoming_fd(fd_name);
  if (auto ok = co_await call(ctx, d, std::move(incoming)); !ok) co_return ok.error();
  if (auto ok = co_await incoming_completed(ctx, d, cancel); !ok) co_return ok.error();
  if (exporting) {
    // The source closed its NBD connections before the switch-over; the exports go before the
    // guest runs here.
    qmp::Command stop = qmp::cmd::nbd_server_stop();
    if (auto ok = co_await call(ctx, d, std::move(stop)); !ok) co_return ok.error();
  }
  if (!paused) {
    qmp::Command cont = qmp::cmd::cont();
    if (auto ok = co_await call(ctx, d, std::move(cont)); !ok) co_return ok.error();
    d.set_state(RunState::running);
  }
  co_return Result<void>{};
}

awaitable<Result<void>> pause_before_switchover(Context& ctx, Domain& d, bool on) {
  using qmp::cmd::MigrationCapability;
  qmp::Command c = qmp::cmd::migrate_set_capabilities({{MigrationCapability::pause_before_switchover, on}});
  if (auto ok = co_await call(ctx, d, std::move(c)); !ok) co_return ok.error();
  co_return Result<void>{};
}

awaitable<Result<qmp::reply::MigrationInfo>> follow_out(Context& ctx, Domain& d,
                                                        const std::string& fd_name, CancelFlag cancel,
                                                        const std::vector<std::string>& mirrors) {
  qmp::Command migrate = qmp::cmd::migrate_to_fd(fd_name);
  if (auto ok = co_await call(ctx, d, std::move(migrate)); !ok) {
    // QEMU still holds the connection: closed, the destination sees the stream end.
    qmp::Command close = qmp::cmd::closefd(fd_name);
    co_await call(ctx, d, std::move(close));
    co_return ok.error();
  }
  co_return co_await follow_live(ctx, d, "migrate", cancel, mirrors);
}

// getfd, migrate fd: (unthrottled), then follow until QEMU's side ends. With mirrors, the
// migration stops before its switch-over for them (follow_live), and only for this migration.
awaitable<Result<qmp::reply::MigrationInfo>> stream_out_fd(Context& ctx, Domain& d,
                                                           fdpass::UniqueFd peer, CancelFlag cancel,
                                                           const std::vector<std::string>& mirrors = {}) {
  qmp::Command speed = qmp::cmd::migrate_set_max_bandwidth(qmp::cmd::kUnlimitedBandwidth);
  if (auto ok = co_await call(ctx, d, std::move(speed)); !ok) co_return ok.error();
  if (!mirrors.empty()) {
    if (auto ok = co_await pause_before_switchover(ctx, d, true); !ok) co_return ok.error();
  }
  const std::string fd_name(kStreamFd);
  if (auto ok = co_await getfd(ctx, d, peer, fd_name); !ok) co_return ok.error();
  peer.reset();
  auto info = co_await follow_out(ctx, d, fd_name, cancel, mirrors);
  if (!mirrors.empty()) {
    if (auto ok = co_await pause_before_switchover(ctx, d, false); !ok) log::warn(ok.error().describe());
  }
  co_return info;
}

// [The disks' copies], then the stream. The destination waits on `peer` while the disks are
// copied: a source that dies closes it, and the destination tears its half down.
awaitable<Result<qmp::reply::MigrationInfo>> copy_then_stream(Context& ctx, Domain& d,
                                                              fdpass::UniqueFd peer,
                                                              CancelFlag cancel, StorageCopy& storage) {
  if (!storage.disks.empty()) {
    if (auto copied = co_await mirror_storage(ctx, d, storage, cancel); !copied) {
      co_await drop_mirrors(ctx, d, storage.disks);
      co_return copied.error();
    }
  }
  auto info = co_await stream_out_fd(ctx, d, std::move(peer), cancel, storage.disks);
  if (!storage.disks.empty() && (!info || info->status != "completed")) {
    co_await drop_mirrors(ctx, d, storage.disks);
  }
  co_return info;
}

// Connect, token, [the disks' copies], then the stream.
awaitable<Result<qmp::reply::MigrationInfo>> stream_out(Context& ctx, Domain& d, std::string endpoint,
                                                        std::string token, CancelFlag cancel,
                                                        StorageCopy& storage) {
  auto peer = fdpass::connect_unix(endpoint);
  if (!peer) co_return errno_error(peer.error().value(), "migration: connecting to " + endpoint, "to");
  const std::string line = token + "\n";
  if (::send(peer->get(), line.data(), line.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(line.size())) {
    co_return errno_error(errno, "migration: sending the token to " + endpoint, "to");
  }
  co_return co_await copy_then_stream(ctx, d, std::move(*peer), cancel, storage);
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

std::vector<std::string> mirrored_disks(const Domain& d) {
  std::vector<std::string> out;
  for (const auto& [id, disk] : d.disks) {
    if (!disk.spec.read_only) out.push_back(id);
  }
  return out;
}

awaitable<Result<Incoming>> prepare_incoming(Context& ctx, Domains& domains, IncomingRequest request) {
  auto described = described_domain(request.domain);
  if (!described) co_return described.error();
  const auto fresh = request.copy_storage ? mirrored_disks(**described) : std::vector<std::string>{};
  if (auto ok = check_identities(ctx, **described, fresh); !ok) co_return ok.error();
  if (request.same_host) {
    if (auto ok = check_own_images(ctx, **described, fresh); !ok) co_return ok.error();
  }
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
    ready = co_await replug(ctx, *d, **described, fresh);
  }
  if (ready && request.same_host) ready = check_plugged_own(*d, **described, fresh);
  if (ready && !fresh.empty()) {
    in.nbd_endpoint = request.listen_dir + "/" + new_token().substr(0, 32) + ".nbd";
    ready = co_await export_disks(ctx, *d, fresh, in.nbd_endpoint);
    if (!ready) in.nbd_endpoint.clear();
  }
  if (ready) {
    auto listener = listen_at(in.endpoint);
    if (listener) in.listener = std::move(*listener);
    else ready = listener.error();
  }
  if (!ready) {
    if (!in.nbd_endpoint.empty()) ::unlink(in.nbd_endpoint.c_str());
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
  const bool exporting = !in.nbd_endpoint.empty();
  if (done) done = co_await stream_in(ctx, *d, std::move(*peer), d->spec().paused, exporting, cancel);
  if (exporting) ::unlink(in.nbd_endpoint.c_str());
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
                                   std::string token, CancelFlag cancel, StorageCopy storage) {
  const bool was_running = d.state() == RunState::running;
  auto info = co_await stream_out(ctx, d, std::move(endpoint), std::move(token), cancel, storage);
  co_return co_await settle_out(ctx, d, was_running, std::move(info), cancel);
}

awaitable<Result<void>> send_state_fd(Context& ctx, Domain& d, fdpass::UniqueFd peer,
                                      CancelFlag cancel, StorageCopy storage) {
  const bool was_running = d.state() == RunState::running;
  auto info = co_await copy_then_stream(ctx, d, std::move(peer), cancel, storage);
  co_return co_await settle_out(ctx, d, was_running, std::move(info), cancel);
}

awaitable<Result<void>> resume_here(Context& ctx, Domain& d) { return ensure_running(ctx, d); }

json::value described_domain_of(const Domain& d, const std::map<std::string, std::string>& disk_paths) {
  json::value v = saved_domain(d);
  if (disk_paths.empty()) return v;
  for (auto& disk : v.as_object()["disks"].as_array()) {
    auto& o = disk.as_object();
    if (auto it = disk_paths.find(std::string(o["id"].as_string())); it != disk_paths.end()) {
      o["path"] = it->second;
    }
  }
  return v;
}

awaitable<bool> recover_migrate(Context& ctx, Domain& d, json::object args) {
  qmp::Command query = qmp::cmd::query_migrate();
  auto r = co_await call(ctx, d, std::move(query));
  std::string status;
  if (r) {
    if (auto info = qmp::reply::migration(*r)) status = info->status;
  }
  const auto* copy = args.if_contains("copy_storage");
  const bool copied = copy != nullptr && copy->is_bool() && copy->get_bool();
  if (status == "completed") {
    // The guest may run here again: a later migration or save must not stop for mirrors.
    if (copied) {
      if (auto ok = co_await pause_before_switchover(ctx, d, false); !ok) log::warn(ok.error().describe());
    }
    const auto* to = args.if_contains("to");
    log::warn("domain " + d.name() + ": its interrupted migration" +
              (to != nullptr && to->is_string() ? " to " + std::string(to->get_string()) : "") +
              " had sent all of its state; the guest stays paused here until the destination "
              "says whether it runs it");
    co_return true;
  }
  if (copied) {
    // Cancelled (even in "pre-switchover"), the migration leaves the mirrors to go.
    if (migration_busy(status)) {
      qmp::Command c = qmp::cmd::migrate_cancel();
      if (auto ok = co_await call(ctx, d, std::move(c)); !ok) log::warn(ok.error().describe());
    }
    std::vector<std::string> disks;
    for (const auto& [id, disk] : d.disks) disks.push_back(id);
    co_await drop_mirrors(ctx, d, disks);
  }
  co_await recover_save(ctx, d, std::move(args));
  // Once the cancelled migration has ended: QEMU refuses capabilities while one runs.
  if (copied) {
    if (auto ok = co_await pause_before_switchover(ctx, d, false); !ok) log::warn(ok.error().describe());
  }
  co_return false;
}

}  // namespace broker::flows
