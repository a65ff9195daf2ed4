// Live update: a running domain moves to a fresh jailed QEMU under the same broker (a new uid),
// for example after a QEMU package upgrade, while its guest runs. The two QEMUs talk over a
// socketpair the broker made and passed to each with getfd; neither opens anything.
//
//   the old QEMU's listeners and log renamed aside (NAME.old.*) and recorded -> the new QEMU
//   spawned under the usual names with -S -incoming defer -> QMP -> devices re-plugged as a
//   restore plugs them -> socketpair -> getfd one end into each -> migrate-incoming fd: (new) ->
//   migrate fd: (old, unthrottled) -> query-migrate on the old for progress until completed ->
//   the new one completed -> cont (when it ran) -> the new QEMU takes the domain's table entry and
//   record -> the old one is killed by its uid.
// A failure or cancel before the switch kills the new QEMU by uid and puts the old one's names
// back; QEMU resumes the old guest after a failed or cancelled migration.
#include <sys/socket.h>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <cstdio>
#include <cstring>

#include "broker/core/errc.hpp"
#include "broker/core/log.hpp"
#include "broker/flows/common.hpp"
#include "broker/flows/flows.hpp"
#include "broker/flows/stream.hpp"
#include "fdpass/devices.hpp"

namespace broker::flows {
namespace asio = boost::asio;
using asio::awaitable;
using namespace detail;

namespace {

constexpr std::string_view kAside = ".old";

// "run/qmp/vm1.sock" -> "run/qmp/vm1.old.sock"
std::string aside(const std::string& path) {
  const auto dot = path.rfind('.');
  return path.substr(0, dot) + std::string(kAside) + path.substr(dot);
}

// Renames the old QEMU's listeners and log out of the way of the new one, which takes the usual
// names. The instance's name follows, so its destroy removes the renamed files.
Result<void> move_aside(Domain& d) {
  auto& inst = d.instance();
  for (std::string* path : {&inst.qmp_path, &inst.console_path, &inst.log_path}) {
    const std::string to = aside(*path);
    if (std::rename(path->c_str(), to.c_str()) != 0) {
      return errno_error(errno, "live update: renaming " + *path + " aside");
    }
    *path = to;
  }
  inst.name = d.name() + std::string(kAside);
  return {};
}

}  // namespace

void put_back(Domain& d) {
  auto& inst = d.instance();
  for (std::string* path : {&inst.qmp_path, &inst.console_path, &inst.log_path}) {
    const std::string suffix = std::string(kAside) + path->substr(path->rfind('.'));
    if (!path->ends_with(suffix)) continue;
    std::string back =
        path->substr(0, path->size() - suffix.size()) + path->substr(path->rfind('.'));
    if (std::rename(path->c_str(), back.c_str()) != 0) {
      log::warn("live update: cannot rename " + *path + " back: " + std::strerror(errno));
      continue;
    }
    *path = std::move(back);
  }
  inst.name = d.name();
}

namespace {

// Waits for the incoming side to finish loading (it ends a moment after the sender).
awaitable<Result<void>> incoming_done(Context& ctx, Domain& d) {
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + ctx.timeouts.migrate_settle;
  asio::steady_timer tick(ctx.ex);
  for (;;) {
    qmp::Command query = qmp::cmd::query_migrate();
    auto r = co_await call(ctx, d, std::move(query));
    if (!r) co_return r.error();
    auto info = qmp::reply::migration(*r);
    if (!info) co_return from_qmp(info.error(), "query-migrate");
    if (info->status == "completed") co_return Result<void>{};
    if (!migration_busy(info->status) || Clock::now() >= deadline) {
      co_return Error(make_error_code(errc::qemu_error),
                      "the new QEMU did not take the state: " + info->status + ": " +
                          info->error_desc.value_or("no reason given"));
    }
    tick.expires_after(std::chrono::milliseconds(2));
    co_await tick.async_wait(asio::as_tuple(asio::use_awaitable));
  }
}

// Everything between the two spawns and the switch: devices, the stream, cont.
awaitable<Result<void>> move_state(Context& ctx, Domains& domains, std::shared_ptr<Domain> old,
                                   std::shared_ptr<Domain> next, CancelFlag cancel,
                                   bool was_running) {
  if (auto ok = co_await domains.attach(next); !ok) co_return ok.error();
  next->set_state(RunState::paused);
  if (auto ok = co_await replug(ctx, *next, *old); !ok) co_return ok.error();
  auto pair = fdpass::make_socketpair(SOCK_STREAM);
  if (!pair) co_return errno_error(pair.error().value(), "live update: cannot make a socketpair");
  const std::string fd_name(kStreamFd);
  if (auto ok = co_await getfd(ctx, *next, pair->second, fd_name); !ok) co_return ok.error();
  pair->second.reset();
  qmp::Command incoming = qmp::cmd::migrate_incoming_fd(fd_name);
  if (auto ok = co_await call(ctx, *next, std::move(incoming)); !ok) co_return ok.error();
  qmp::Command speed = qmp::cmd::migrate_set_max_bandwidth(qmp::cmd::kUnlimitedBandwidth);
  if (auto ok = co_await call(ctx, *old, std::move(speed)); !ok) co_return ok.error();
  if (auto ok = co_await getfd(ctx, *old, pair->first, fd_name); !ok) co_return ok.error();
  pair->first.reset();
  qmp::Command migrate = qmp::cmd::migrate_to_fd(fd_name);
  if (auto ok = co_await call(ctx, *old, std::move(migrate)); !ok) co_return ok.error();
  auto info = co_await follow_live(ctx, *old, "live-update", cancel);
  if (!info) co_return info.error();
  if (cancel && *cancel) co_return cancelled("the live update of domain " + old->name());
  if (info->status != "completed") {
    co_return Error(make_error_code(errc::qemu_error),
                    "the old QEMU's migration " + info->status + ": " +
                        info->error_desc.value_or("no reason given"));
  }
  if (auto ok = co_await incoming_done(ctx, *next); !ok) co_return ok.error();
  if (was_running) {
    qmp::Command cont = qmp::cmd::cont();
    if (auto ok = co_await call(ctx, *next, std::move(cont)); !ok) co_return ok.error();
    next->set_state(RunState::running);
  }
  co_return Result<void>{};
}

// Undoes an update that did not switch: the new QEMU goes by its uid, the old one keeps its names
// and runs as it did.
awaitable<void> roll_back(Context& ctx, Domains& domains, std::shared_ptr<Domain> old,
                          std::shared_ptr<Domain> next, bool was_running) {
  if (next) {
    if (auto killed = co_await domains.retire(next); !killed) log::error(killed.error().describe());
  }
  put_back(*old);
  if (auto ok = co_await domains.records().persist(*old); !ok) log::error(ok.error().describe());
  if (was_running) {
    if (auto ok = co_await ensure_running(ctx, *old); !ok) log::warn(ok.error().describe());
  }
}

}  // namespace

awaitable<Result<std::shared_ptr<Domain>>> live_update(Context& ctx, Domains& domains,
                                                       std::shared_ptr<Domain> old,
                                                       CancelFlag cancel) {
  const bool was_running = old->state() == RunState::running;
  if (auto ok = move_aside(*old); !ok) {
    put_back(*old);
    co_return ok.error();
  }
  // Recorded before the spawn: a broker that dies from here on still finds the old QEMU.
  if (auto ok = co_await domains.records().persist(*old); !ok) {
    co_await roll_back(ctx, domains, old, nullptr, false);
    co_return ok.error();
  }
  auto next = std::make_shared<Domain>(old->spec());
  std::vector<std::string> incoming{"-incoming", "defer"};
  if (auto ok = co_await domains.spawn_beside(next, incoming); !ok) {
    co_await roll_back(ctx, domains, old, nullptr, was_running);
    co_return ok.error();
  }
  if (auto ok = co_await move_state(ctx, domains, old, next, cancel, was_running); !ok) {
    co_await roll_back(ctx, domains, old, next, was_running);
    co_return ok.error();
  }
  // The switch: the record names the new QEMU before the old one goes.
  if (auto ok = co_await domains.replace(next); !ok) log::error(ok.error().describe());
  if (auto killed = co_await domains.retire(old); !killed) {
    log::error("domain " + old->name() +
               ": the QEMU it left could not be killed: " + killed.error().describe());
  }
  co_return next;
}

}  // namespace broker::flows
