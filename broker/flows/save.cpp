// Save: QEMU streams the domain's state into a pipe the broker passed it; the broker copies the
// stream into a file beneath the save root. QEMU never opens the file.
//
//   check the run state -> open the directory beneath the save root -> temp file + header ->
//   pipe -> getfd (write end; the broker's copy closed) -> copy thread pipe -> file ->
//   migrate fd:qb-migrate -> follow (progress, cancel) -> trailer -> fsync -> rename -> fsync
//   the directory -> cont when it ran and is kept.
// A failure or cancel before the rename: QEMU's migration cancelled, the temp file removed, the
// guest running as before (QEMU resumes a guest whose migration failed or was cancelled).
#include <fcntl.h>
#include <linux/openat2.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/json.hpp>
#include <chrono>
#include <thread>

#include "broker/core/errc.hpp"
#include "broker/core/log.hpp"
#include "broker/domain/state_file.hpp"
#include "broker/flows/common.hpp"
#include "broker/flows/flows.hpp"
#include "broker/flows/save_file.hpp"
#include "broker/flows/stream.hpp"
#include "fdpass/devices.hpp"

namespace broker::flows {
namespace asio = boost::asio;
namespace json = boost::json;
using asio::awaitable;
using namespace detail;

namespace {

// openat2 beneath `dirfd`, following no link: the save root is the caller's boundary.
int open_beneath(int dirfd, const std::string& rel, std::uint64_t flags) {
  open_how how{};
  how.flags = flags;
  how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
  return static_cast<int>(::syscall(SYS_openat2, dirfd, rel.c_str(), &how, sizeof(how)));
}

// `path` split into its directory and file name.
std::pair<std::string, std::string> split(const std::string& path) {
  const auto slash = path.rfind('/');
  return {path.substr(0, slash), path.substr(slash + 1)};
}

}  // namespace

namespace detail {

Error errno_error(int e, const std::string& what, std::string_view field) {
  Error err(std::error_code(e, std::system_category()), what);
  err.field = std::string(field);
  return err;
}

Error cancelled(const std::string& what) {
  return Error(make_error_code(errc::cancelled), what + " was cancelled");
}

Result<SaveTarget> open_target(const std::string& save_root, const std::string& path,
                               const std::string& domain) {
  if (save_root.empty()) {
    Error e(make_error_code(errc::forbidden),
            "path: this broker has no --save-root; save and restore are off");
    e.field = "path";
    return e;
  }
  std::string root = save_root;
  while (root.size() > 1 && root.back() == '/') root.pop_back();
  if (path.size() <= root.size() + 1 || path.compare(0, root.size(), root) != 0 ||
      path[root.size()] != '/') {
    return field_error("path", path + " is not beneath the save root " + root);
  }
  const std::string rel = path.substr(root.size() + 1);
  auto [dir_rel, name] = split("/" + rel);
  if (name.empty() || name == "." || name == ".." || rel.find("//") != std::string::npos) {
    return field_error("path", path + " does not name a file");
  }
  fdpass::UniqueFd root_fd(::open(root.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC));
  if (!root_fd) return errno_error(errno, "path: cannot open the save root " + root, "path");
  const std::string dir_path = dir_rel.empty() ? "." : dir_rel.substr(1);
  fdpass::UniqueFd dir(open_beneath(root_fd.get(), dir_path, O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dir) {
    return errno_error(errno,
                       "path: the directory of " + path + " cannot be opened beneath the save root",
                       "path");
  }
  return SaveTarget{std::move(dir), name, "." + name + "." + domain + ".part"};
}

void publish_progress(Context& ctx, const Domain& d, const Follow& what, std::uint64_t bytes,
                      const qmp::reply::MigrationInfo& info,
                      std::chrono::steady_clock::duration took) {
  const double secs = std::chrono::duration<double>(took).count();
  const std::uint64_t total = what.total != 0 ? what.total : info.total;
  double fraction = 0;
  if (what.total != 0) {
    fraction = static_cast<double>(bytes) / static_cast<double>(what.total);
  } else if (info.total != 0) {
    // QEMU's own estimate: the share of RAM no longer left to send.
    fraction = static_cast<double>(info.total - std::min(info.remaining, info.total)) /
               static_cast<double>(info.total);
  }
  if (info.status == "completed") fraction = 1.0;
  ctx.events.publish(d.name(), "job", "progress",
                     {{"job", what.job},
                      {"phase", info.status},
                      {"bytes", bytes},
                      {"total", total},
                      {"rate", secs > 0 ? static_cast<double>(bytes) / secs : 0.0},
                      {"fraction", fraction}});
}

awaitable<Result<qmp::reply::MigrationInfo>> follow(Context& ctx, Domain& d,
                                                    save_file::StreamCopy& copy,
                                                    std::shared_ptr<asio::steady_timer> wake,
                                                    Follow what, CancelFlag cancel) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  auto last_event = start - std::chrono::hours(1);
  std::string last_phase;
  std::optional<Clock::time_point> copy_ended;
  bool stop_sent = false;
  for (;;) {
    // While the copy runs, it wakes this loop when it ends; after it, QEMU is asked often, as
    // it is about to finish.
    wake->expires_after(copy.done() ? std::chrono::milliseconds(2) : ctx.timeouts.migrate_poll);
    co_await wake->async_wait(asio::as_tuple(asio::use_awaitable));
    const bool done = copy.done();
    qmp::Command query = qmp::cmd::query_migrate();
    auto r = co_await call(ctx, d, std::move(query));
    if (!r) co_return r.error();
    auto info = qmp::reply::migration(*r);
    if (!info) co_return from_qmp(info.error(), "query-migrate");
    const std::string& st = info->status;
    const bool qemu_busy = st == "setup" || st == "active" || st == "device" ||
                           st == "pre-switchover" || st == "cancelling" || st == "wait-unplug";
    const bool stop = (cancel && *cancel) || (what.outgoing && done && copy.error() != 0);
    if (stop && !stop_sent) {
      stop_sent = true;
      copy.stop();
      if (what.outgoing) {
        qmp::Command c = qmp::cmd::migrate_cancel();
        if (auto ok = co_await call(ctx, d, std::move(c)); !ok) log::warn(ok.error().describe());
      }
    }
    const auto now = Clock::now();
    // A few events a second, and every change of phase.
    if (now - last_event >= std::chrono::milliseconds(250) || st != last_phase || !qemu_busy) {
      last_event = now;
      last_phase = st;
      publish_progress(ctx, d, what, copy.bytes(), *info, now - start);
    }
    if (done && !qemu_busy) co_return *info;
    // An incoming QEMU has no cancel: once the copy stopped, its migration is abandoned.
    if (done && stop_sent && !what.outgoing) co_return *info;
    if (done) {
      if (!copy_ended) copy_ended = now;
      if (now - *copy_ended > ctx.timeouts.migrate_settle) {
        co_return Error(make_error_code(errc::qemu_timeout),
                        what.job + ": QEMU's migration is still " + st + " after the stream ended");
      }
    }
  }
}

}  // namespace detail

std::string save_temp_path(const std::string& path, const std::string& domain) {
  auto [dir, name] = split(path);
  return dir + "/." + name + "." + domain + ".part";
}

namespace {

// The temp file, removed unless the save got as far as its rename.
struct TempFile {
  int dir;
  std::string name;
  bool keep = false;
  TempFile(int d, std::string n) : dir(d), name(std::move(n)) {}
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
  ~TempFile() {
    if (!keep) ::unlinkat(dir, name.c_str(), 0);
  }
};

Result<void> write_all(int fd, std::string_view data, const std::string& what) {
  while (!data.empty()) {
    ssize_t n = ::write(fd, data.data(), data.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno_error(errno, "path: " + what, "path");
    data.remove_prefix(static_cast<std::size_t>(n));
  }
  return {};
}

}  // namespace

namespace detail {

// The domain as the header keeps it: its spec and devices with their paths and identities, not
// the instance that ran it.
json::value saved_domain(const Domain& d) {
  json::object o = state_to_json(d).as_object();
  for (const char* k : {"instance", "state", "job", "fdsets_to_close", "destroying", "vnc"})
    o.erase(k);
  return o;
}

}  // namespace detail

namespace {

// Trailer, fsync, rename over the target, fsync of the directory: the file is whole under its
// name or not there. A file the rename replaces is held (O_PATH) and released on a thread of its
// own: freeing a large file's blocks is the filesystem's work at its last reference, and took about
// 20 ms of a 90 MiB save on ext4 when it ran inside the rename.
Result<void> commit_file(int file, const SaveTarget& target, const save_file::StreamCopy& copy,
                         const std::string& path) {
  const std::string tail = save_file::trailer(copy.bytes(), copy.crc());
  if (auto ok = write_all(file, tail, "writing the save file's trailer " + path); !ok) return ok;
  if (::fsync(file) != 0) return errno_error(errno, "path: fsync of " + path, "path");
  fdpass::UniqueFd replaced(
      ::openat(target.dir.get(), target.name.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC));
  if (::renameat(target.dir.get(), target.temp.c_str(), target.dir.get(), target.name.c_str()) !=
      0) {
    return errno_error(errno, "path: renaming the save file to " + path, "path");
  }
  if (::fsync(target.dir.get()) != 0) log::warn("fsync of the directory of " + path + " failed");
  if (replaced) std::thread([old = std::move(replaced)] {}).detach();
  return {};
}

}  // namespace

awaitable<Result<void>> detail::ensure_running(Context& ctx, Domain& d) {
  qmp::Command q = qmp::cmd::query_status();
  auto st = co_await call(ctx, d, std::move(q));
  if (!st) co_return st.error();
  auto status = qmp::reply::status(*st);
  if (status && status->running) co_return Result<void>{};
  qmp::Command cont = qmp::cmd::cont();
  auto r = co_await call(ctx, d, std::move(cont));
  if (!r) co_return r.error();
  co_return Result<void>{};
}

namespace {

// The stream, from QEMU through the pipe into `file`: the migration's final state and the copy.
awaitable<Result<void>> stream_into(Context& ctx, Domain& d, int file, std::uint32_t head_crc,
                                    CancelFlag cancel,
                                    std::unique_ptr<save_file::StreamCopy>& copy) {
  auto pipe = fdpass::make_pipe();
  if (!pipe) co_return errno_error(pipe.error().value(), "save: cannot make a pipe");
  ::fcntl(pipe->first.get(), F_SETPIPE_SZ, 1 << 20);  // fewer, larger reads; best effort
  // Unthrottled, as the broker's own disk is the only limit (QEMU's default is 32 MiB/s).
  qmp::Command speed = qmp::cmd::migrate_set_max_bandwidth(qmp::cmd::kUnlimitedBandwidth);
  if (auto ok = co_await call(ctx, d, std::move(speed)); !ok) co_return ok.error();
  const std::string fd_name(kStreamFd);
  if (auto sent = co_await getfd(ctx, d, pipe->second, fd_name); !sent) co_return sent.error();
  pipe->second.reset();  // QEMU holds the write end now: its close is the copy's EOF
  auto wake = std::make_shared<asio::steady_timer>(ctx.ex);
  save_file::StreamCopy::Options how{.src_offset = std::nullopt,
                                     .limit = std::nullopt,
                                     .crc = head_crc,
                                     .write_behind = true,
                                     .own_src = std::move(pipe->first),
                                     .own_dst = {}};
  copy = std::make_unique<save_file::StreamCopy>(ctx.ex, wake, fdpass::BorrowedFd(),
                                                 fdpass::BorrowedFd(file), std::move(how));
  qmp::Command migrate = qmp::cmd::migrate_to_fd(fd_name);
  if (auto ok = co_await call(ctx, d, std::move(migrate)); !ok) {
    qmp::Command close = qmp::cmd::closefd(fd_name);
    co_await call(ctx, d, std::move(close));
    copy.reset();
    co_return ok.error();
  }
  Follow what{"save", true, 0};
  auto info = co_await follow(ctx, d, *copy, wake, std::move(what), cancel);
  const bool was_cancelled = cancel && *cancel;
  const int copy_error = copy->error();
  if (!info || was_cancelled || copy_error != 0) copy.reset();
  if (!info) co_return info.error();
  if (was_cancelled) co_return cancelled("the save of domain " + d.name());
  if (copy_error != 0) {
    co_return errno_error(copy_error,
                          "path: writing the save file failed; the partial file was removed and "
                          "domain " +
                              d.name() + " runs on",
                          "path");
  }
  if (info->status != "completed") {
    co_return Error(
        make_error_code(errc::qemu_error),
        "QEMU's migration " + info->status + ": " + info->error_desc.value_or("no reason given"));
  }
  co_return Result<void>{};
}

}  // namespace

awaitable<Result<void>> save(Context& ctx, Domain& d, SaveRequest request, CancelFlag cancel) {
  if (d.state() != RunState::running && d.state() != RunState::paused) {
    co_return Error(make_error_code(errc::wrong_state),
                    "domain " + d.name() + " is " + std::string(to_string(d.state())));
  }
  auto target = open_target(ctx.save_root, request.path, d.name());
  if (!target) co_return target.error();
  const bool was_running = d.state() == RunState::running;
  fdpass::UniqueFd file(::openat(target->dir.get(), target->temp.c_str(),
                                 O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600));
  if (!file)
    co_return errno_error(errno, "path: cannot create the save file beside " + request.path,
                          "path");
  TempFile temp(target->dir.get(), target->temp);
  const std::string head = save_file::begin(saved_domain(d));
  if (auto ok = write_all(file.get(), head, "writing the save file " + request.path); !ok)
    co_return ok.error();
  const std::uint32_t head_crc = save_file::checksum(0, head.data() + save_file::kPreambleSize,
                                                     head.size() - save_file::kPreambleSize);

  // From here on a failure resumes a guest that ran: QEMU does so itself after a failed or
  // cancelled migration, not after one that completed and was then refused.
  std::unique_ptr<save_file::StreamCopy> copy;
  Result<void> done = co_await stream_into(ctx, d, file.get(), head_crc, cancel, copy);
  // QEMU has sent everything and stopped the guest: a cancel that came meanwhile still wins.
  if (done && cancel && *cancel) done = cancelled("the save of domain " + d.name());
  if (done) done = commit_file(file.get(), *target, *copy, request.path);
  if (!done) {
    if (was_running) co_await ensure_running(ctx, d);
    co_return done.error();
  }
  temp.keep = true;
  if (request.keep_running && was_running) {
    if (auto ok = co_await ensure_running(ctx, d); !ok) co_return ok.error();
  }
  co_return Result<void>{};
}

awaitable<void> recover_save(Context& ctx, Domain& d, json::object args) {
  const auto* path = args.if_contains("path");
  const auto* ran = args.if_contains("was_running");
  // QEMU's side: a migration still going has lost its reader; cancel it and let QEMU resume.
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + ctx.timeouts.migrate_settle;
  bool cancel_sent = false;
  while (Clock::now() < deadline) {
    qmp::Command q = qmp::cmd::query_migrate();
    auto r = co_await call(ctx, d, std::move(q));
    if (!r) break;
    auto info = qmp::reply::migration(*r);
    if (!info) break;
    const std::string& st = info->status;
    if (!migration_busy(st)) break;
    if (!cancel_sent) {
      cancel_sent = true;
      qmp::Command c = qmp::cmd::migrate_cancel();
      co_await call(ctx, d, std::move(c));
    }
    asio::steady_timer t(ctx.ex, std::chrono::milliseconds(20));
    co_await t.async_wait(asio::as_tuple(asio::use_awaitable));
  }
  // A stream handed over (getfd) before the migrate command ran is still in QEMU's fd list:
  // closed, its peer sees the end (an incoming migration stops waiting). None is no error.
  qmp::Command close = qmp::cmd::closefd(std::string(kStreamFd));
  co_await call(ctx, d, std::move(close));
  if (path != nullptr && path->is_string()) {
    const std::string p(path->get_string());
    auto target = open_target(ctx.save_root, p, d.name());
    if (target && ::unlinkat(target->dir.get(), target->temp.c_str(), 0) == 0) {
      log::info("domain " + d.name() + ": removed the partial save file of an interrupted save");
    }
  }
  if (ran != nullptr && ran->is_bool() && ran->get_bool()) {
    if (auto ok = co_await ensure_running(ctx, d); !ok) log::warn(ok.error().describe());
  }
}

}  // namespace broker::flows
